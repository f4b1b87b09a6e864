"""Two real processes under torchrun (gloo, CPU) train ``recipes/demo_cpu.yaml`` (the real StreamPETR
detector, data pipeline and metric, tiny overrides) through ``python -m streampetr_plugin.cli.run``.

The test plugin of ``tests/trainer_helpers.py`` is installed as an entry point for the child
processes; its ``streampetr_post_train`` hook writes each rank's parameters and the sample tokens its
training forwards saw to ``<work_dir>/rank<r>.pt`` (after the final checkpoint and evaluation).
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from streampetr_plugin import build_model, load_recipe
from streampetr_plugin.adapters.base import AdapterContext, AdapterRunner, Phase
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.data.build import build_dataset
from streampetr_plugin.data.infos import load_info_file
from streampetr_plugin.data.loader import build_dataloader
from streampetr_plugin.evaluation.predictions import load_predictions
from streampetr_plugin.training.checkpointing import load_checkpoint
from streampetr_plugin.training.evaluation import collect_predictions
from streampetr_plugin.training.metrics_log import read_metrics
from tests import trainer_helpers

ITERATIONS = 4  # 2 stream slots (2 processes x 1 frame) x 4 iterations = the 2 train scenes of 4 frames


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _overrides(synthetic_nuscenes, work_dir):
    return trainer_helpers.demo_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version) + [
        f"runtime.work_dir={work_dir}", f"runtime.max_iters={ITERATIONS}", "runtime.checkpoint_interval=2",
    ]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, synthetic_nuscenes):
    root = tmp_path_factory.mktemp("ddp")
    plugin_path = trainer_helpers.install_as_distribution(root / "dist")
    work_dir = root / "run"
    overrides = _overrides(synthetic_nuscenes, work_dir)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "streampetr_plugin.cli.run",
        str(trainer_helpers.DEMO_RECIPE), *overrides,
    ]
    completed = subprocess.run(command, env=trainer_helpers.subprocess_env(plugin_path), cwd=root,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [torch.load(work_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    return work_dir, ranks, completed.stderr


def test_parameters_stay_identical_across_ranks(two_process_run):
    _, (rank0, rank1), _ = two_process_run
    assert rank0["iteration"] == rank1["iteration"] == ITERATIONS
    assert rank0["final"].keys() == rank1["final"].keys()
    for key in rank0["final"]:
        assert torch.equal(rank0["final"][key], rank1["final"][key]), key
    changed = [k for k in rank0["final"] if not torch.equal(rank0["initial"][k], rank0["final"][k])]
    assert {k.split(".")[0] for k in changed} >= {"img_backbone", "img_neck", "img_roi_head", "pts_bbox_head"}


def test_ranks_evaluate_and_checkpoint_rank0s_buffers(two_process_run):
    # Training does not broadcast buffers (the reference's broadcast_buffers=False), so the demo's
    # trainable BatchNorm statistics follow each rank's own frames; before the checkpoint and the
    # evaluation every rank takes rank 0's, and the checkpoint holds exactly those.
    work_dir, (rank0, rank1), _ = two_process_run
    saved = load_checkpoint(work_dir / "checkpoints" / f"iter_{ITERATIONS:08d}.pth")["state_dict"]
    assert any(key.endswith("running_mean") for key in rank0["buffers"])
    for key, value in rank0["buffers"].items():
        assert torch.equal(value, rank1["buffers"][key]), key
        assert torch.equal(value, saved[key]), key


def test_two_rank_evaluation_equals_one_process_on_the_saved_checkpoint(two_process_run, synthetic_nuscenes):
    work_dir, _, _ = two_process_run
    recipe = load_recipe(trainer_helpers.DEMO_RECIPE, _overrides(synthetic_nuscenes, work_dir))
    host = create_plugin_host()
    model = build_model(recipe)
    # The recipe's model-phase adapters, as the ranks applied them (the demo's backbone layout: the same
    # numbers to float32 rounding, but the comparison below is tighter).
    AdapterRunner.from_recipe(recipe, "cpu", host.registries).run(
        Phase.MODEL, AdapterContext(device="cpu", recipe=recipe, model=model)
    )
    checkpoint = work_dir / "checkpoints" / f"iter_{ITERATIONS:08d}.pth"
    model.load_state_dict(load_checkpoint(checkpoint)["state_dict"])
    dataset = build_dataset(recipe, host.registries, training=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training processes, so that the sums run in the same order
    try:
        # Each rank's slice of the val set in this one process: the same streams the ranks ran.
        expected = {}
        for rank in (0, 1):
            loader = build_dataloader(dataset, batch_size=recipe.data.val_batch_size_per_device,
                                      num_workers=0, rank=rank, world_size=2, seed=0, training=False)
            expected[rank] = collect_predictions(model, loader, device=torch.device("cpu"),
                                                 autocast=contextlib.nullcontext())
    finally:
        torch.set_num_threads(threads)
    scored = load_predictions(work_dir / "eval" / f"iter_{ITERATIONS:08d}" / "predictions.npz")
    assert expected[1] and set(scored) == set(expected[0]) | set(expected[1])
    for predictions in expected.values():
        for token, output in predictions.items():
            for key, value in output.items():
                np.testing.assert_allclose(scored[token][key], value.numpy(), rtol=0, atol=1e-6)


def test_each_rank_trains_on_its_own_shard(two_process_run, synthetic_nuscenes):
    _, (rank0, rank1), _ = two_process_run
    infos = load_info_file(synthetic_nuscenes.train_info, root=synthetic_nuscenes.root)
    scene_of = {sample.token: sample.scene_token for sample in infos.samples}
    seen0, seen1 = rank0["seen"], rank1["seen"]
    assert len(seen0) == len(seen1) == ITERATIONS
    assert not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == sorted(scene_of)  # together: every training frame once
    # Each rank's one stream slot walks one whole scene in time order.
    for seen in (seen0, seen1):
        assert len({scene_of[token] for token in seen}) == 1
        order = [sample.token for sample in sorted(infos.samples, key=lambda s: s.timestamp)]
        assert seen == sorted(seen, key=order.index)


def test_rank0_checkpoints_logs_and_evaluates_the_whole_val_set(two_process_run):
    work_dir, _, stderr = two_process_run
    state = load_checkpoint(work_dir / "checkpoints" / f"iter_{ITERATIONS:08d}.pth")
    assert state["world_size"] == 2
    assert len(state["rng"]) == len(state["sampler"]) == len(state["streams"]) == 2
    assert all(streams["pts_bbox_head"] for streams in state["streams"])  # each rank's memory queue
    records = read_metrics(work_dir / "metrics.jsonl")
    assert [r["iteration"] for r in records if r["kind"] == "train"] == list(range(1, ITERATIONS + 1))
    evaluation = [r for r in records if r["kind"] == "eval"]
    assert len(evaluation) == 1 and {"mAP", "NDS"} <= set(evaluation[0])
    # the metric report is logged bare, lines starting "mAP:" / "NDS:" as harnesses grep them
    assert any(line.startswith("NDS:") for line in stderr.splitlines())
    assert "4 samples" in stderr  # both ranks' halves of the val scene gathered
    assert "2 processes, gloo" in stderr
    assert any(line.split()[:3] == ["model", "ddp_static_graph", "APPLIED"] for line in stderr.splitlines())
    assert stderr.count("adapters:") == 1  # only rank 0 prints the start-up table
