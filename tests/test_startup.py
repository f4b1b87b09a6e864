"""The start-up shared by training, evaluation and the benchmark: device, model, optimiser, run length."""
import pytest
import torch

from streampetr_plugin import load_recipe
from streampetr_plugin.adapters.base import Phase
from streampetr_plugin.errors import InputError
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.training.startup import (
    build_device_model,
    build_run_optimizer,
    iteration_plan,
    select_device,
)

TINY = ["accelerator.device=cpu", "model.backbone.spec_name=V-tiny", "model.neck.out_channels=32",
        "model.roi_head.embed_dims=32", "model.head.embed_dims=32", "model.head.num_layers=1",
        "model.head.num_heads=4", "model.head.feedforward_channels=64"]


@pytest.mark.parametrize("overrides, samples, expected", [
    # 28130 reference samples over 8 processes x 2 frames: 1758 per epoch, 24 epochs, a checkpoint each
    (["data.num_train_samples=28130", "data.batch_size_per_device=2", "runtime.epochs=24"], 10, (1758, 42192, 1758)),
    # without num_train_samples the dataset's length counts; max_iters and the interval win when set
    (["~data.num_train_samples", "runtime.max_iters=100", "runtime.checkpoint_interval=7"], 160, (10, 100, 7)),
])
def test_iteration_plan_follows_the_reference_accounting(overrides, samples, expected):
    recipe = load_recipe("vov_8p", overrides)
    plan = iteration_plan(recipe, num_samples=samples, world_size=8)
    assert (plan.iters_per_epoch, plan.max_iters, plan.checkpoint_interval) == expected


def test_device_model_and_optimizer_run_every_adapter_phase_in_order():
    host = create_plugin_host()
    recipe = load_recipe("demo_cpu", TINY, host)
    threads = torch.get_num_threads()
    try:
        selection = select_device(recipe, host, environ={})
        model, precision = build_device_model(recipe, host, selection)
        optimizer = build_run_optimizer(model, recipe, host, selection)
    finally:
        torch.set_num_threads(threads)
    assert selection.device.kind == "cpu" and selection.context.model is model
    phases = [record.phase for record in selection.adapters.records]
    assert phases == sorted(phases, key=list(Phase).index) and Phase.OPTIMIZER in phases
    assert all(group["initial_lr"] == group["lr"] for group in optimizer.param_groups)
    assert precision.dtype is None  # the CPU trains in fp32


def test_missing_load_from_weights_name_the_key(tmp_path):
    host = create_plugin_host()
    recipe = load_recipe("demo_cpu", TINY, host)
    selection = select_device(recipe, host, environ={})
    with pytest.raises(InputError, match=r"runtime.load_from: .*missing.pth does not exist"):
        build_device_model(recipe, host, selection, load_from=str(tmp_path / "missing.pth"))
