"""Every loader of a serialized file refuses one that would run code, in one line naming the file, and
runs nothing; damaged files are one-line errors too, never reported as unsafe."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mindspeed_mm_host.harness import host_environment

from streampetr_plugin.data.infos import load_reference_pkl
from streampetr_plugin.errors import InputError
from streampetr_plugin.evaluation.predictions import (
    PREDICTIONS_FORMAT,
    PREDICTIONS_FORMAT_VERSION,
    load_predictions,
)
from streampetr_plugin.interop.checkpoint import read_checkpoint_state_dict
from streampetr_plugin.safe_loading import UnreadableFileError, UnsafePickleError, load_torch_file
from streampetr_plugin.training.checkpointing import CheckpointError, load_checkpoint


class CreatesMarker:
    """Unpickles as ``exec("open(marker, 'w').close()")``: a full unpickler would create the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _malicious_training_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"format": 2, "state_dict": {"w": torch.zeros(2)}, "iteration": 1,
                "optimizer": {"hook": CreatesMarker(marker)}}, path)


def _malicious_load_from(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": CreatesMarker(marker)}, path)


def _malicious_info_pkl(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"infos": [CreatesMarker(marker)], "metadata": {}}, protocol=2))


def _malicious_predictions(path: Path, marker: Path) -> None:
    tokens = np.empty(1, dtype=object)  # a well-formed file, except that its tokens are a pickle
    tokens[0] = CreatesMarker(marker)
    np.savez(path, format=np.array(PREDICTIONS_FORMAT), version=np.array(PREDICTIONS_FORMAT_VERSION),
             offsets=np.array([0, 1]), boxes_3d=np.zeros((1, 9), np.float32),
             scores_3d=np.zeros(1, np.float32), labels_3d=np.zeros(1, np.int64), sample_tokens=tokens)


LOADERS = {
    "training checkpoint": ("iter_00000002.pth", _malicious_training_checkpoint, load_checkpoint),
    "load_from / eval weights": ("weights.pth", _malicious_load_from, read_checkpoint_state_dict),
    "reference info .pkl": ("infos.pkl", _malicious_info_pkl, load_reference_pkl),
    "predictions .npz": ("predictions.npz", _malicious_predictions, load_predictions),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_loader_refuses_a_file_that_would_run_code(loader, tmp_path):
    name, write, load = LOADERS[loader]
    path, marker = tmp_path / name, tmp_path / "executed"
    write(path, marker)
    with pytest.raises((InputError, ValueError)) as raised:
        load(path)
    assert not marker.exists()
    if isinstance(raised.value, InputError):  # the package's own loaders: one line naming the file
        message = str(raised.value)
        assert "\n" not in message and message.startswith(str(path))
        assert "builtins.exec" in message or "refusing to unpickle" in message


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    directory, marker = tmp_path / "iter_0000003", tmp_path / "executed"
    directory.mkdir()
    (directory / ".metadata").write_bytes(pickle.dumps(CreatesMarker(marker)))
    with host_environment():
        from streampetr_plugin.integrations.mindspeed_mm.checkpoint import load_host_checkpoint

        with pytest.raises(UnsafePickleError) as raised:
            load_host_checkpoint(directory)
    message = str(raised.value)
    assert not marker.exists()
    assert "\n" not in message and message.startswith(str(directory / ".metadata"))
    assert "builtins.exec" in message


def test_a_real_dcp_checkpoint_still_converts(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = {"img_neck.weight": torch.randn(3, 4), "pts_bbox_head.bias": torch.randn(2).to(torch.bfloat16),
             "img_backbone.bn.num_batches_tracked": torch.tensor(7)}
    optimizer = {"state": {0: {"exp_avg": torch.randn(3, 4), "step": torch.tensor(3.0)}}, "lr": 0.1}
    with pytest.warns(UserWarning, match="single process"):  # DCP's note on saving without a group
        dcp.save({"model": model, "optimizer": optimizer, "args": {"seed": 1}},
                 checkpoint_id=str(tmp_path / "iter_0000001"), no_dist=True)
    with host_environment():
        from streampetr_plugin.integrations.mindspeed_mm.checkpoint import load_host_checkpoint

        loaded = load_host_checkpoint(tmp_path / "iter_0000001")
    assert loaded.keys() == model.keys()
    for key, value in model.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_dcp_metadata_pointing_outside_its_directory_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import Metadata

    directory = tmp_path / "iter_0000001"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=str(directory), no_dist=True)
    with open(directory / ".metadata", "rb") as handle:
        metadata: Metadata = pickle.load(handle)  # written just above by torch itself
    for info in metadata.storage_data.values():
        info.relative_path = "../../secret.bin"
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with host_environment():
        from streampetr_plugin.integrations.mindspeed_mm.checkpoint import load_host_checkpoint

        with pytest.raises(UnreadableFileError, match="outside its checkpoint directory"):
            load_host_checkpoint(directory)


def _damaged_files(tmp_path: Path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, good)
    content = good.read_bytes()
    files = {"empty": b"", "truncated": content[: len(content) // 2], "text": b"not a checkpoint\n",
             "random bytes": np.random.default_rng(0).bytes(5000)}
    for kind, data in files.items():
        (tmp_path / f"{kind}.pth").write_bytes(data)
    return [tmp_path / f"{kind}.pth" for kind in files] + [tmp_path / "missing.pth"]


def test_damaged_or_missing_files_are_one_line_errors_not_reported_as_unsafe(tmp_path):
    for path in _damaged_files(tmp_path):
        for load, error in ((load_torch_file, UnreadableFileError), (load_checkpoint, CheckpointError),
                            (read_checkpoint_state_dict, UnreadableFileError)):
            with pytest.raises(error) as raised:
                load(path)
            message = str(raised.value)
            assert message.startswith(str(path)) and "\n" not in message, message
            assert "unpickle" not in message and isinstance(raised.value, InputError)
    assert os.path.exists(tmp_path / "good.pth")
