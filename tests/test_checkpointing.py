"""Training checkpoint files: the content checksum, what pruning may delete, failed writes, the
non-finite and model-fit checks."""
from __future__ import annotations

import copy
import errno
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from streampetr_plugin.errors import EXIT_BAD_INPUT, EXIT_FAILURE
from streampetr_plugin.interop.checkpoint import read_checkpoint_state_dict
from streampetr_plugin.training import checkpointing
from streampetr_plugin.training.checkpointing import (
    CheckpointError,
    CheckpointWriteError,
    check_model_fits,
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    nonfinite_entries,
    prune_checkpoints,
    write_checkpoint,
)
from streampetr_plugin.checksum import content_digest

FLIPPED_BYTES = 4096


def training_state(iteration: int, size: int = 16384) -> dict:
    """A checkpoint-shaped state whose bulk is one optimiser moment of ``size`` float32 values."""
    generator = torch.Generator().manual_seed(iteration)
    weight = torch.randn(size, generator=generator)
    return {
        "format": checkpointing.CHECKPOINT_FORMAT,
        "state_dict": {"layer.weight": weight, "bn.num_batches_tracked": torch.tensor(iteration)},
        "optimizer": {"state": {0: {"step": torch.tensor(float(iteration)), "exp_avg": weight * 0.1,
                                    "exp_avg_sq": weight.square() + 1.0}},
                      "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}]},
        "iteration": iteration,
        "rng": [{"python": (3, tuple(range(5)), None)}],
        "recipe": {"name": "unit", "runtime": {"seed": 0}},
    }


def flip_middle_of(path: Path, tensor: torch.Tensor, count: int = FLIPPED_BYTES) -> None:
    """Invert ``count`` bytes in the middle of where ``tensor``'s data lies in the file (torch stores
    tensor data uncompressed, so its bytes appear verbatim)."""
    content = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    start = content.find(raw)
    assert start >= 0 and len(raw) > count
    middle = start + (len(raw) - count) // 2
    content[middle:middle + count] = bytes(byte ^ 0xFF for byte in content[middle:middle + count])
    path.write_bytes(bytes(content))


def test_the_checksum_follows_every_value_and_survives_a_round_trip(tmp_path):
    state = training_state(3)
    digest = content_digest(state)
    assert digest.startswith("sha256:") and content_digest(copy.deepcopy(state)) == digest
    write_checkpoint(state, tmp_path / "c.pth")
    assert content_digest(torch.load(tmp_path / "c.pth", weights_only=True)) == digest
    changes = [
        lambda s: s["state_dict"]["layer.weight"].view(-1)[5].add_(1e-6),
        lambda s: s["optimizer"]["state"][0].update(step=torch.tensor(4.0)),
        lambda s: s["optimizer"]["param_groups"][0].update(lr=0.02),
        lambda s: s.update(iteration=4),
        lambda s: s["recipe"].update(name="other"),
        lambda s: s["state_dict"].update({"bn.num_batches_tracked": torch.tensor(3.0)}),  # same value, float
        lambda s: s["rng"][0].update(python=(3, tuple(range(4)), None)),
    ]
    for change in changes:
        changed = copy.deepcopy(state)
        change(changed)
        assert content_digest(changed) != digest


def test_flipped_bytes_in_the_optimiser_state_are_caught_on_every_load_path(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    for iteration in (2, 4):
        write_checkpoint(training_state(iteration), checkpoint_path(directory, iteration))
    damaged = checkpoint_path(directory, 4)
    flip_middle_of(damaged, training_state(4)["optimizer"]["state"][0]["exp_avg_sq"])
    assert torch.load(damaged, weights_only=True)["iteration"] == 4  # the damage still unpickles

    for load in (load_checkpoint, read_checkpoint_state_dict):  # resume=PATH; eval and load_from
        with pytest.raises(CheckpointError) as raised:
            load(damaged)
        message = str(raised.value)
        assert message.startswith(f"{damaged}: content checksum mismatch") and "\n" not in message
        assert raised.value.exit_status == EXIT_BAD_INPUT
    with caplog.at_level(logging.WARNING):
        path, state = find_latest_checkpoint(directory)  # resume=auto falls back to the previous one
    assert path == checkpoint_path(directory, 2) and state["iteration"] == 2
    assert any(str(damaged) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)


def test_a_file_of_the_unchecked_format_loads_with_a_warning(tmp_path, caplog):
    state = training_state(1)
    state["format"] = checkpointing.UNCHECKED_FORMAT
    torch.save(state, tmp_path / "old.pth")
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(tmp_path / "old.pth")["iteration"] == 1
    assert any("cannot be verified" in r.getMessage() for r in caplog.records)


def test_pruning_removes_only_checkpoints_older_than_the_one_just_written(tmp_path):
    directory = tmp_path / "checkpoints"
    for iteration in (28, 29, 30):  # another run's, or unreadable ones a resume skipped
        checkpoint_path(directory, iteration).parent.mkdir(exist_ok=True)
        checkpoint_path(directory, iteration).write_bytes(b"older run")
    for iteration in (2, 4, 6, 8):
        write_checkpoint(training_state(iteration, size=8), checkpoint_path(directory, iteration))
        deleted = prune_checkpoints(directory, keep_last=2, written_iteration=iteration)
        assert checkpoint_path(directory, iteration).is_file() and all(
            int(path.stem.split("_")[1]) < iteration for path in deleted)
    assert [i for i, _ in list_checkpoints(directory)] == [6, 8, 28, 29, 30]


def _assert_failed_write(directory: Path, raised: pytest.ExceptionInfo) -> None:
    target = checkpoint_path(directory, 4)
    message = str(raised.value)
    assert message.startswith(f"{target}: cannot be written") and "\n" not in message
    assert raised.value.exit_status == EXIT_FAILURE
    assert sorted(path.name for path in directory.iterdir()) == ["iter_00000002.pth"]  # nothing partial
    assert load_checkpoint(checkpoint_path(directory, 2))["iteration"] == 2


def test_a_full_disk_leaves_no_partial_file_and_the_earlier_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    write_checkpoint(training_state(2), checkpoint_path(directory, 2))

    def disk_fills_up(obj, handle, *args, **kwargs):
        handle.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpointing.torch, "save", disk_fills_up)
    with pytest.raises(CheckpointWriteError) as raised:
        write_checkpoint(training_state(4), checkpoint_path(directory, 4))
    assert "No space left on device" in str(raised.value)
    _assert_failed_write(directory, raised)


def test_a_read_only_directory_leaves_the_earlier_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    write_checkpoint(training_state(2), checkpoint_path(directory, 2))
    directory.chmod(0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("permissions do not bind this user (root): the full-disk test covers the write path")
        with pytest.raises(CheckpointWriteError) as raised:
            write_checkpoint(training_state(4), checkpoint_path(directory, 4))
    finally:
        directory.chmod(0o755)
    _assert_failed_write(directory, raised)


def test_nonfinite_entries_name_every_nan_or_infinite_value():
    state = {"model": {"a": torch.tensor([1.0, math.nan]), "n": torch.tensor([3]), "b": torch.ones(2)},
             "optimizer": {0: {"exp_avg_sq": torch.tensor([math.inf]), "step": torch.tensor(2.0)}},
             "scale": -math.inf, "lr": 0.1}
    assert sorted(nonfinite_entries(state)) == ["model.a", "optimizer.0.exp_avg_sq", "scale"]
    assert nonfinite_entries({"model": {"a": torch.zeros(3)}, "steps": [1, 2.5]}) == []


def test_a_checkpoint_of_another_model_is_named_with_what_differs(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    saved = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).state_dict()
    with pytest.raises(CheckpointError) as raised:
        check_model_fits(tmp_path / "iter_00000004.pth", saved, model)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'iter_00000004.pth'}: the model does not fit this run")
    assert "0.weight: checkpoint (6, 4) vs model (8, 4)" in message and "new runtime.work_dir" in message
    del saved["1.running_var"]
    with pytest.raises(CheckpointError, match="1 missing, e.g. 1.running_var"):
        check_model_fits(tmp_path / "iter_00000004.pth", saved, model)
    check_model_fits(tmp_path / "iter_00000004.pth", model.state_dict(), model)
