"""Faults injected into real training runs of the stand-in recipe (tests/trainer_helpers.py): processes
killed with SIGKILL between and during saves, damaged, truncated and malicious checkpoints, non-finite
training, a full or read-only disk, a work dir that already holds checkpoints, a recipe changed under
a work dir. Each checks the exit status, the one error line, that every checkpoint left behind
verifies and is finite, and that nothing was lost or run.

Runs through ``python -m streampetr_plugin.cli.run`` where the exit status is the point; in-process
where the error object says as much.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from streampetr_plugin.config.loader import load_recipe
from streampetr_plugin.errors import EXIT_BAD_INPUT, EXIT_FAILURE
from streampetr_plugin.training import checkpointing
from streampetr_plugin.training.checkpointing import (
    CheckpointError,
    CheckpointWriteError,
    WorkDirNotEmptyError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    nonfinite_entries,
    write_checkpoint,
)
from streampetr_plugin.training.trainer import Trainer, train
from tests import trainer_helpers
from tests.test_checkpointing import flip_middle_of
from tests.test_safe_loading import CreatesMarker

HOST = trainer_helpers.standin_host()

# A backbone of 256 channels: the optimiser moments of its weight are 12288 values (48 KiB) each, room
# for 4 KiB of damage in the middle of one.
WIDE = "model.backbone.width=256"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """``(recipe path, plugin path)``: the stand-in recipe, its plugin registered on :data:`HOST` and
    installed as an entry point for child processes."""
    root = tmp_path_factory.mktemp("standin")
    threads = torch.get_num_threads()
    yield trainer_helpers.write_recipe(root), trainer_helpers.install_as_distribution(root / "dist")
    torch.set_num_threads(threads)


def _recipe(standin, work_dir: Path, *overrides: str):
    return load_recipe(standin[0], [f"runtime.work_dir={work_dir}", WIDE, "runtime.checkpoint_interval=2",
                                    *overrides], host=HOST)


@pytest.fixture(scope="module")
def trained(standin, tmp_path_factory) -> Path:
    """Six iterations in one go: checkpoints after 2, 4 and 6."""
    work_dir = tmp_path_factory.mktemp("trained")
    assert train(_recipe(standin, work_dir), host=HOST).iteration == 6
    return work_dir


def _copy(trained: Path, tmp_path: Path) -> Path:
    work_dir = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", work_dir / "checkpoints")
    return work_dir


def run_cli(standin, work_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "streampetr_plugin.cli.run", str(standin[0]),
               f"runtime.work_dir={work_dir}", WIDE, "runtime.checkpoint_interval=2", *overrides]
    return subprocess.run(command, env=trainer_helpers.subprocess_env(standin[1]), capture_output=True,
                          text=True, timeout=240)


def the_error_line(completed: subprocess.CompletedProcess) -> str:
    """The one line the command reported its error in; no traceback."""
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    lines = [line for line in completed.stderr.splitlines() if " ERROR " in line or line.startswith("error:")]
    assert len(lines) == 1, completed.stderr[-3000:]
    return lines[0]


def verified_iterations(work_dir: Path) -> List[int]:
    """The iterations of the checkpoints in ``work_dir``, each checked: checksum, finite contents, and
    no partial file beside them."""
    directory = work_dir / "checkpoints"
    assert [path.name for path in directory.iterdir() if not path.name.startswith("iter_")] == []
    for _, path in list_checkpoints(directory):
        state = load_checkpoint(path)
        assert nonfinite_entries({"model": state["state_dict"], "optimizer": state["optimizer"]}) == [], path
    return [iteration for iteration, _ in list_checkpoints(directory)]


def assert_same_weights(path: Path, reference: Path) -> None:
    weights, expected = load_checkpoint(path)["state_dict"], load_checkpoint(reference)["state_dict"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in weights)


KILLED = """
import os, signal, sys
from streampetr_plugin.config.loader import load_recipe
from streampetr_plugin.training.trainer import Trainer
from tests import trainer_helpers

HOST = trainer_helpers.standin_host()
recipe, work_dir, moment = sys.argv[1:4]
trainer = Trainer(load_recipe(recipe, [f"runtime.work_dir={work_dir}", *sys.argv[4:]], host=HOST), host=HOST)
trainer.setup()

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "between saves":  # in the forward of iteration 5, after the checkpoints of 2 and 4
    calls = []

    def count_forwards(module, args):
        calls.append(module.training)
        if calls.count(True) == 5:
            die()

    trainer.model.register_forward_pre_hook(count_forwards)
else:  # saving iteration 4: its temporary file complete and flushed, not yet renamed into place
    real_replace = os.replace
    os.replace = lambda source, target: (die() if str(target).endswith("iter_00000004.pth")
                                         else real_replace(source, target))
trainer.train()
"""


@pytest.mark.parametrize("moment", ["between saves", "while saving"])
def test_a_process_killed_leaves_verified_checkpoints_and_resumes_exactly(moment, standin, trained, tmp_path):
    work_dir = tmp_path / "run"
    command = trainer_helpers.python_script(KILLED) + [str(standin[0]), str(work_dir), moment, WIDE,
                                                       "runtime.checkpoint_interval=2"]
    completed = subprocess.run(command, env=trainer_helpers.subprocess_env(), capture_output=True, text=True,
                               timeout=240)
    assert completed.returncode == -signal.SIGKILL, completed.stderr[-3000:]
    checkpoints = work_dir / "checkpoints"
    leftovers = [path.name for path in checkpoints.iterdir() if not path.name.startswith("iter_")]
    assert len(leftovers) == (0 if moment == "between saves" else 1)  # a resume clears it (checked below)
    survivors = [2, 4] if moment == "between saves" else [2]
    assert [i for i, _ in list_checkpoints(checkpoints)] == survivors
    for iteration in survivors:
        load_checkpoint(checkpoint_path(checkpoints, iteration))

    result = train(_recipe(standin, work_dir), host=HOST)
    assert result.iteration == 6 and verified_iterations(work_dir) == [2, 4, 6]
    assert_same_weights(result.last_checkpoint, checkpoint_path(trained / "checkpoints", 6))


def test_nan_losses_stop_the_run_naming_the_iteration_and_the_last_good_checkpoint(standin, tmp_path):
    work_dir = tmp_path / "run"
    completed = run_cli(standin, work_dir, "model.nan_calls=[5, 6, 7]", "runtime.max_nonfinite_steps=3",
                        "runtime.max_iters=10")
    assert completed.returncode == EXIT_FAILURE
    line = the_error_line(completed)
    last_good = checkpoint_path(work_dir / "checkpoints", 6)
    assert "iteration 7: the loss or the gradients were not finite in 3 consecutive iterations" in line
    assert f"last good checkpoint: {last_good}" in line
    # The steps of 5 and 6 were skipped, so the checkpoint of 6 holds the weights of 4: finite.
    assert verified_iterations(work_dir) == [2, 4, 6]


def test_damaged_optimiser_moments_never_reach_a_checkpoint(standin, trained, tmp_path):
    """The damage the checksum cannot see: written into a checkpoint with a valid checksum (as if it
    happened in memory before the save). The sign bits of 4 KiB of the second moment: the first step
    after the resume has a finite loss and makes the weights NaN."""
    work_dir = _copy(trained, tmp_path)
    last_good = checkpoint_path(work_dir / "checkpoints", 6)
    state = load_checkpoint(last_good)
    moment = state["optimizer"]["state"][0]["exp_avg_sq"]  # of img_backbone.conv.weight
    assert moment.shape == (256, 3, 4, 4)
    moment.view(-1)[:1024].neg_()  # 1024 float32 values: 4 KiB
    write_checkpoint(state, last_good)

    completed = run_cli(standin, work_dir, "runtime.max_iters=10", "runtime.checkpoint_interval=1")
    assert completed.returncode == EXIT_FAILURE
    line = the_error_line(completed)
    assert "iteration 7: not saving a checkpoint: the training state is not finite" in line
    assert f"last good checkpoint: {last_good}" in line
    assert [i for i, _ in list_checkpoints(work_dir / "checkpoints")] == [2, 4, 6]


def test_flipped_bytes_stop_an_explicit_resume_and_auto_falls_back(standin, trained, tmp_path):
    work_dir = _copy(trained, tmp_path)
    damaged = checkpoint_path(work_dir / "checkpoints", 6)
    state = load_checkpoint(damaged)
    flip_middle_of(damaged, state["optimizer"]["state"][0]["exp_avg_sq"])
    before = damaged.read_bytes()

    completed = run_cli(standin, work_dir, f"runtime.resume={damaged}")
    assert completed.returncode == EXIT_BAD_INPUT
    assert f"{damaged}: content checksum mismatch" in the_error_line(completed)
    assert damaged.read_bytes() == before and not (work_dir / "metrics.jsonl").exists()

    completed = run_cli(standin, work_dir)  # resume=auto: back to the checkpoint of 4, then on to 6
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert any("skipping checkpoint" in line and f"{damaged}: content checksum mismatch" in line
               for line in completed.stderr.splitlines())
    assert f"resumed from {checkpoint_path(work_dir / 'checkpoints', 4)} at iteration 4" in completed.stderr
    assert verified_iterations(work_dir) == [2, 4, 6]
    assert_same_weights(damaged, checkpoint_path(trained / "checkpoints", 6))


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(standin, tmp_path):
    marker, path = tmp_path / "executed", tmp_path / "iter_00000004.pth"
    torch.save({"format": 2, "state_dict": {}, "iteration": 4, "optimizer": CreatesMarker(marker)}, path)
    completed = run_cli(standin, tmp_path / "run", f"runtime.resume={path}")
    assert completed.returncode == EXIT_BAD_INPUT
    line = the_error_line(completed)
    assert f"{path}: refusing to unpickle builtins.exec" in line
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_resume_none_refuses_a_work_dir_with_checkpoints(standin, trained, tmp_path):
    work_dir = _copy(trained, tmp_path)
    before = {path.name: path.read_bytes() for path in (work_dir / "checkpoints").iterdir()}
    with pytest.raises(WorkDirNotEmptyError) as raised:
        Trainer(_recipe(standin, work_dir, "runtime.resume=none"), host=HOST).setup()
    message = str(raised.value)
    assert raised.value.exit_status == EXIT_BAD_INPUT and "\n" not in message
    assert message.startswith(f"{work_dir / 'checkpoints'}: holds 3 checkpoint(s)")
    assert "runtime.resume=auto" in message and "runtime.work_dir" in message
    assert {path.name: path.read_bytes() for path in (work_dir / "checkpoints").iterdir()} == before


def test_with_every_checkpoint_unreadable_a_run_keeps_its_own_new_ones(standin, trained, tmp_path, caplog):
    work_dir = _copy(trained, tmp_path)
    for _, path in list_checkpoints(work_dir / "checkpoints"):
        path.write_bytes(path.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        result = train(_recipe(standin, work_dir, "runtime.max_iters=4", "runtime.keep_last=1"), host=HOST)
    loud = [r.getMessage() for r in caplog.records if "NO USABLE CHECKPOINT" in r.getMessage()]
    assert len(loud) == 1 and all(f"iter_0000000{i}.pth" in loud[0] for i in (2, 4, 6))
    # The run's own checkpoint of 4 replaced the damaged one and survives; the run's 2 was pruned as
    # older; the damaged 6 is not the run's to remove.
    assert result.last_checkpoint == checkpoint_path(work_dir / "checkpoints", 4)
    assert [i for i, _ in list_checkpoints(work_dir / "checkpoints")] == [4, 6]
    assert load_checkpoint(result.last_checkpoint)["iteration"] == 4
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint_path(work_dir / "checkpoints", 6))


@pytest.mark.parametrize("change, differs", [
    ("model.backbone.width=128",
     "the model does not fit this run (4 shapes differ, e.g. "
     "img_backbone.conv.weight: checkpoint (256, 3, 4, 4) vs model (128, 3, 4, 4)"),
    ("data.batch_size_per_device=3", "the data sampler state does not fit this run"),
])
def test_resuming_after_a_recipe_change_names_the_checkpoint_and_what_differs(
    change, differs, standin, trained, tmp_path
):
    work_dir = _copy(trained, tmp_path)
    with pytest.raises(CheckpointError) as raised:
        Trainer(_recipe(standin, work_dir, change), host=HOST).setup()
    message = str(raised.value)
    assert raised.value.exit_status == EXIT_BAD_INPUT and "\n" not in message
    assert message.startswith(f"{checkpoint_path(work_dir / 'checkpoints', 6)}: {differs}")
    assert "new runtime.work_dir" in message


def test_a_save_on_a_full_or_read_only_disk_stops_the_run_and_keeps_what_was_saved(
    standin, trained, tmp_path, monkeypatch
):
    work_dir = _copy(trained, tmp_path)
    checkpoints = work_dir / "checkpoints"
    checkpoints.chmod(0o555)
    if os.access(checkpoints, os.W_OK):  # root: permissions do not bind, so the write fails as if they did
        def read_only(path, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        monkeypatch.setattr(checkpointing, "open", read_only, raising=False)
    try:
        with pytest.raises(CheckpointWriteError) as raised:
            train(_recipe(standin, work_dir, "runtime.max_iters=8"), host=HOST)
    finally:
        checkpoints.chmod(0o755)
    message = str(raised.value)
    assert raised.value.exit_status == EXIT_FAILURE and "\n" not in message
    assert message.startswith(f"{checkpoint_path(checkpoints, 8)}: cannot be written")
    assert verified_iterations(work_dir) == [2, 4, 6]
