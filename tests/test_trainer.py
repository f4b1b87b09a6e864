"""The trainer on the CPU with the stand-in recipe (tests/trainer_helpers.py): iteration accounting,
lr per iteration, checkpoints (contents, keep-last, atomic writes, resume), non-finite losses,
load_from, run directory and the command line."""
from __future__ import annotations

import io
import logging
import math
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from streampetr_plugin.cli.run import main as run_main
from streampetr_plugin.config.loader import load_recipe, recipe_to_dict
from streampetr_plugin.interop.checkpoint import load_reference_checkpoint
from streampetr_plugin import build_model
from streampetr_plugin.training.checkpointing import (
    NonFiniteLossError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from streampetr_plugin.training.distributed import DistributedSetupError, read_distributed_env
from streampetr_plugin.training.lr_schedule import CosineWarmup, CosineWarmupParams
from streampetr_plugin.training.metrics_log import ProgressBar, read_metrics
from streampetr_plugin.training.step import total_loss
from streampetr_plugin.training.trainer import Trainer, train
from tests import trainer_helpers


HOST = trainer_helpers.standin_host()


@pytest.fixture(scope="module")
def standin_recipe(tmp_path_factory):
    threads = torch.get_num_threads()
    yield trainer_helpers.write_recipe(tmp_path_factory.mktemp("recipe"))
    torch.set_num_threads(threads)


def _recipe(path: Path, work_dir: Path, *overrides: str):
    return load_recipe(path, [f"runtime.work_dir={work_dir}", *overrides], host=HOST)


def _train_losses(work_dir: Path):
    records = read_metrics(work_dir / "metrics.jsonl")
    return [(r["iteration"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def straight_run(standin_recipe, tmp_path_factory):
    """Six iterations in one go, checkpoints after 3 and 6."""
    work_dir = tmp_path_factory.mktemp("straight")
    result = train(_recipe(standin_recipe, work_dir, "runtime.checkpoint_interval=3"), host=HOST)
    return work_dir, result


def test_total_loss_sums_only_loss_entries():
    losses = {"loss_cls": torch.tensor(1.0), "d0.loss_bbox": torch.tensor(2.0), "num_pos": torch.tensor(7.0),
              "dn_loss_cls": [torch.tensor(0.5), torch.tensor(0.25)]}
    assert total_loss(losses).item() == 3.75


def test_iteration_plan_follows_the_reference_accounting(standin_recipe, tmp_path):
    trainer = Trainer(_recipe(standin_recipe, tmp_path, "~runtime.max_iters", "runtime.epochs=2"), host=HOST)
    trainer.setup()
    # 24 samples // (1 process x 2 frames) = 12 iterations per epoch; checkpoints once per epoch.
    assert (trainer.iters_per_epoch, trainer.max_iters, trainer.checkpoint_interval) == (12, 24, 12)

    trainer = Trainer(_recipe(standin_recipe, tmp_path, "~runtime.max_iters", "runtime.epochs=3",
                              "data.num_train_samples=20"), host=HOST)
    trainer.setup()
    assert (trainer.iters_per_epoch, trainer.max_iters) == (10, 30)


def test_lr_is_set_per_iteration_from_the_schedule_with_multipliers(standin_recipe, tmp_path):
    work_dir = tmp_path / "run"
    trainer = Trainer(_recipe(standin_recipe, work_dir, "optimization.lr_multipliers={img_backbone: 0.1}"),
                      host=HOST)
    trainer.train()
    schedule = CosineWarmup(max_iters=6, **dict(CosineWarmupParams(warmup_iters=2)))
    records = [r for r in read_metrics(work_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:  # the record after step i shows the lr that step used: schedule(i - 1)
        assert math.isclose(record["lr"], 0.01 * schedule(record["iteration"] - 1), rel_tol=1e-12)
    backbone, rest = trainer.optimizer.param_groups
    assert backbone["lr_mult"] == 0.1 and len(backbone["params"]) == 2  # img_backbone.conv weight and bias
    assert math.isclose(backbone["lr"], 0.1 * rest["lr"], rel_tol=1e-12)


def test_run_directory_holds_recipe_metrics_and_checkpoints(straight_run, standin_recipe):
    work_dir, result = straight_run
    assert result.iteration == 6 and result.last_checkpoint == work_dir / "checkpoints" / "iter_00000006.pth"
    saved = yaml.safe_load((work_dir / "recipe.yaml").read_text())
    assert saved == recipe_to_dict(_recipe(standin_recipe, work_dir, "runtime.checkpoint_interval=3"))
    records = read_metrics(work_dir / "metrics.jsonl")
    assert len(records) == 6
    expected = {"kind", "iteration", "epoch", "loss_main", "d0.loss_aux", "num_rows", "loss", "lr",
                "grad_norm", "loss_scale", "skipped_steps", "step_time", "data_time", "samples_per_s",
                "peak_memory_mib"}
    assert set(records[0]) == expected
    first = records[0]
    assert math.isclose(first["loss"], first["loss_main"] + first["d0.loss_aux"], rel_tol=1e-6)
    assert first["num_rows"] == 2.0 and first["loss_scale"] is None and first["skipped_steps"] == 0
    assert first["samples_per_s"] > 0 and first["peak_memory_mib"] > 0
    assert [i for i, _ in list_checkpoints(work_dir / "checkpoints")] == [3, 6]


def test_checkpoint_holds_the_training_state_and_loads_weights_only(straight_run, standin_recipe):
    work_dir, _ = straight_run
    state = load_checkpoint(work_dir / "checkpoints" / "iter_00000006.pth")  # weights_only=True inside
    assert state["iteration"] == 6 and state["world_size"] == 1
    assert state["scheduler"] == {"type": "cosine_warmup", "iteration": 6}
    assert state["optimizer_class"] == "torch.optim.adamw.AdamW" and state["scaler"] is None
    assert state["optimizer"]["state"] and len(state["optimizer"]["param_groups"]) == 2
    assert state["sampler"][0]["iteration"] == 6
    assert set(state["streams"][0][""]) == {"state"}  # the stand-in detector's memory
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "device"}
    assert state["recipe"]["name"] == "standin"
    versions = state["plugin_versions"]
    assert versions["streampetr-builtin"] and trainer_helpers.PLUGIN_NAME in versions
    # The model weights use the reference layout, so load_from / interop read them too.
    model = build_model(load_recipe(standin_recipe, host=HOST), HOST)
    assert load_reference_checkpoint(model, work_dir / "checkpoints" / "iter_00000006.pth").is_exact


def test_keep_last_prunes_old_checkpoints(standin_recipe, tmp_path):
    train(_recipe(standin_recipe, tmp_path, "runtime.max_iters=4", "runtime.checkpoint_interval=1",
                  "runtime.keep_last=2"), host=HOST)
    assert [i for i, _ in list_checkpoints(tmp_path / "checkpoints")] == [3, 4]


def test_periodic_and_final_evaluation_and_missing_tensorboard(standin_recipe, tmp_path, caplog):
    recipe = _recipe(standin_recipe, tmp_path, "runtime.max_iters=4", "runtime.eval_interval=2",
                     "runtime.evaluate_at_end=true", "runtime.tensorboard=true")
    with caplog.at_level(logging.WARNING):
        result = train(recipe, host=HOST)
    evaluations = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["iteration"] for r in evaluations] == [2, 4]
    assert evaluations[-1]["num_predictions"] == 8.0 and result.eval_metrics == {
        key: value for key, value in evaluations[-1].items() if key not in ("kind", "iteration")
    }
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert any("TensorBoard is not installed" in r.getMessage() and "pip install" in r.getMessage()
                   for r in caplog.records)
    else:
        assert (tmp_path / "tensorboard").is_dir()


def test_resume_after_a_crash_continues_exactly(synthetic_nuscenes, tmp_path):
    """The demo recipe (real detector, data, sampler), 4 iterations straight == 2, crash, ``resume:
    auto``, 2 more: identical losses and weights. Exercised: data position, random augmentation
    (flip, global rotation and scaling, keyed by stream position), streaming memory, GridMask and
    denoising randomness (torch RNG), optimiser moments, lr schedule position.
    """
    overrides = trainer_helpers.demo_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version) + [
        "runtime.max_iters=4", "runtime.checkpoint_interval=2", "runtime.evaluate_at_end=false"]
    demo = trainer_helpers.DEMO_RECIPE
    train(load_recipe(demo, [*overrides, f"runtime.work_dir={tmp_path / 'straight'}"], host=HOST), host=HOST)

    recipe = load_recipe(demo, [*overrides, f"runtime.work_dir={tmp_path / 'crashed'}"], host=HOST)
    crashing = Trainer(recipe, host=HOST)
    crashing.setup()
    trainer_helpers.crash_on_training_forward(crashing.model, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    assert [i for i, _ in list_checkpoints(tmp_path / "crashed" / "checkpoints")] == [2]

    resumed = Trainer(recipe, host=HOST)
    resumed.setup()
    assert resumed.iteration == 2
    resumed.train()
    losses = _train_losses(tmp_path / "crashed")
    assert [i for i, _ in losses] == [1, 2, 3, 4]
    assert losses == _train_losses(tmp_path / "straight")
    final = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "iter_00000004.pth")["state_dict"]
    reference = load_checkpoint(tmp_path / "straight" / "checkpoints" / "iter_00000004.pth")["state_dict"]
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in final)


def test_resume_auto_skips_a_corrupt_newest_checkpoint(straight_run, tmp_path, caplog):
    shutil.copytree(straight_run[0] / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "iter_00000006.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        path, state = find_latest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "iter_00000003.pth" and state["iteration"] == 3
    assert any("skipping checkpoint" in r.getMessage() and "iter_00000006.pth" in r.getMessage()
               for r in caplog.records)


KILLED_WHILE_SAVING = """
import io, os, signal, sys
import torch
from streampetr_plugin.config.loader import load_recipe
from streampetr_plugin.training.trainer import train
from tests import trainer_helpers

HOST = trainer_helpers.standin_host()
real_save = torch.save
saves = []

def save_then_die_halfway(obj, handle, *args, **kwargs):
    saves.append(1)
    if len(saves) < 2:
        return real_save(obj, handle, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    handle.write(buffer.getvalue()[: buffer.tell() // 2])
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die_halfway
overrides = [f"runtime.work_dir={sys.argv[2]}", "runtime.checkpoint_interval=3"]
recipe = load_recipe(sys.argv[1], overrides, host=HOST)
train(recipe, host=HOST)
"""


def test_process_killed_while_writing_a_checkpoint_leaves_the_previous_one(standin_recipe, tmp_path):
    work_dir = tmp_path / "run"
    command = trainer_helpers.python_script(KILLED_WHILE_SAVING) + [str(standin_recipe), str(work_dir)]
    completed = subprocess.run(command, env=trainer_helpers.subprocess_env(), capture_output=True, text=True,
                               timeout=240)
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    checkpoints = work_dir / "checkpoints"
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".iter_00000006.pth.")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # killed mid-write
    assert [i for i, _ in list_checkpoints(checkpoints)] == [3]
    assert load_checkpoint(checkpoints / "iter_00000003.pth")["iteration"] == 3

    resumed = Trainer(_recipe(standin_recipe, work_dir, "runtime.checkpoint_interval=3"), host=HOST)
    resumed.setup()
    assert resumed.iteration == 3 and not partial[0].exists()
    assert resumed.train().iteration == 6
    assert [i for i, _ in list_checkpoints(checkpoints)] == [3, 6]


def test_nonfinite_loss_skips_the_step(standin_recipe, tmp_path):
    trainer = Trainer(_recipe(standin_recipe, tmp_path, "model.nan_calls=[2]"), host=HOST)
    trainer.setup()
    batches = iter(trainer.train_loader)
    assert trainer.train_step(next(batches))["skipped"] == 0.0
    trainer.iteration += 1
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    terms = trainer.train_step(next(batches))
    assert terms["skipped"] == 1.0 and math.isnan(terms["loss"]) and math.isnan(terms["loss_main"])
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], moments)
    trainer.iteration += 1
    assert trainer.train_step(next(batches))["skipped"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_dynamic_loss_scale_skips_the_nonfinite_step_and_backs_off(standin_recipe, tmp_path):
    trainer = Trainer(_recipe(standin_recipe, tmp_path, "model.nan_calls=[2]"), host=HOST)
    trainer.setup()
    # The CPU trains in fp32; a CPU GradScaler exercises the loop's fp16 branch (dynamic loss scale).
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batches = iter(trainer.train_loader)
    assert trainer.train_step(next(batches))["skipped"] == 0.0 and trainer.precision.loss_scale() == 1024.0
    trainer.iteration += 1
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.train_step(next(batches))["skipped"] == 1.0
    assert trainer.precision.loss_scale() == 512.0  # backed off, as GradScaler does on an overflow
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.iteration += 1
    assert trainer.train_step(next(batches))["skipped"] == 0.0 and trainer.precision.loss_scale() == 512.0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_consecutive_nonfinite_losses_stop_with_a_clear_message(standin_recipe, tmp_path):
    recipe = _recipe(standin_recipe, tmp_path, "model.nan_calls=[2, 3, 5, 6, 7, 8]",
                     "runtime.max_nonfinite_steps=3", "runtime.max_iters=10")
    with pytest.raises(NonFiniteLossError, match=r"iteration 7: the loss or the gradients were not finite in "
                                                 r"3 consecutive .*max_nonfinite_steps=3.*loss_main"):
        train(recipe, host=HOST)
    skipped = [r["skipped_steps"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert skipped == [0, 1, 1, 0, 1, 1]  # iteration 7 raised before its line was written
    assert torch.load(tmp_path / "rank0.pt", weights_only=True)["iteration"] == 7  # post_train hook ran


def test_load_from_initialises_the_model_unless_resuming(standin_recipe, tmp_path):
    source = build_model(load_recipe(standin_recipe, host=HOST), HOST)
    weights = {key: torch.full_like(value, 0.25) for key, value in source.state_dict().items()}
    torch.save({"state_dict": weights, "meta": {}}, tmp_path / "pretrained.pth")
    load_from = f"runtime.load_from={tmp_path / 'pretrained.pth'}"
    trainer = Trainer(_recipe(standin_recipe, tmp_path / "run", load_from), host=HOST)
    trainer.setup()
    assert all(torch.equal(trainer.model.state_dict()[key], value) for key, value in weights.items())


def test_distributed_environment_is_validated():
    assert read_distributed_env({}).world_size == 1
    env = read_distributed_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (env.rank, env.local_rank, env.world_size, env.is_main) == (1, 1, 2, False)
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR/MASTER_PORT are not set.*torchrun"):
        read_distributed_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="RANK=2 is outside WORLD_SIZE=2"):
        read_distributed_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_progress_bar_shows_position_rate_and_eta():
    stream = io.StringIO()
    bar = ProgressBar(total=10, initial=2, stream=stream)
    bar.update(3, "loss 1.0")
    text = stream.getvalue()
    assert "3/10" in text and "it/s" in text and "ETA" in text and "loss 1.0" in text


def test_cli_trains_and_reports_recipe_errors_in_one_line(standin_recipe, tmp_path, capsys):
    assert run_main([str(standin_recipe), f"runtime.work_dir={tmp_path}", "runtime.max_iters=2"], HOST) == 0
    assert (tmp_path / "checkpoints" / "iter_00000002.pth").is_file()
    capsys.readouterr()
    assert run_main([str(standin_recipe), "runtime.max_itres=2"], HOST) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: <command line>: runtime.max_itres: unknown key (did you mean ")
