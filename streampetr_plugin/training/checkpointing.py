"""Training checkpoints: atomic, checksummed writes, keep-last-k, finding the newest usable one, RNG states.

A checkpoint is ``<work_dir>/checkpoints/iter_<iteration>.pth``, one ``torch.save`` of a dict::

    state_dict       the model's weights (reference key names; also what ``load_from`` reads)
    optimizer        optimiser state;       optimizer_class   its qualified class name
    scheduler        {"type", "iteration"}  (the schedule is a function of the iteration)
    scaler           loss-scaler state or None
    iteration        completed training iterations
    sampler          per rank: the training sampler's state_dict() (position, for resume)
    streams          per rank: the detector's ``stream_state.save()`` (so a resumed run continues its streams)
    rng              per rank: python, numpy, torch and device RNG states
    recipe           the resolved recipe (plain data);  plugin_versions  plugin name -> version
    world_size, format
    checksum         "sha256:<hex>" of everything above (:mod:`.checksum`)

Everything in it is plain data and tensors, so it loads with ``torch.load(..., weights_only=True)``.
It is written to a hidden temporary file in the same directory, flushed to disk and renamed over the
final name, so a process killed mid-write never leaves a truncated ``iter_*.pth`` behind; a write that
fails (read-only directory, full disk) removes its temporary file and raises
:class:`CheckpointWriteError`. Loading recomputes the checksum: a file damaged after it was written
(copied partially, disk trouble, flipped bytes) is a :class:`CheckpointError`, which resuming with
``runtime.resume=auto`` skips with a warning. Pruning removes only checkpoints older than the one a
run has just written, so a run never deletes its own newest checkpoint nor files it did not supersede.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.errors import InputError, RunError, describe
from streampetr_plugin.models.stream_state import stream_state_of
from streampetr_plugin.safe_loading import load_torch_file
from streampetr_plugin.training.checksum import CHECKSUM_KEY, content_digest

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
# Format 1 is format 2 without the checksum; such files still load, unverified, with a warning.
UNCHECKED_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pth$")
_TEMPORARY_NAME = re.compile(r"^\.iter_\d+\.pth\.\d+\.tmp$")
REQUIRED_KEYS = ("format", "state_dict", "iteration", "optimizer")
_NEW_RUN_FIX = (
    "the recipe changed since it was written: train in a new runtime.work_dir, or resume with that recipe"
)


class CheckpointError(InputError):
    """A file that is not a usable training checkpoint: unreadable, damaged, or not this run's shape."""


class CheckpointWriteError(RunError):
    """A run's output (a checkpoint, its work dir) could not be written: read-only or full disk."""


def checkpoint_path(directory: Path, iteration: int) -> Path:
    return Path(directory) / f"iter_{iteration:08d}.pth"


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def to_cpu(value: Any) -> Any:
    """Tensors (also inside dicts, lists and tuples) copied to host memory, so a checkpoint written on
    an NPU or GPU loads on any machine."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def write_failure(path: Path, error: OSError) -> CheckpointWriteError:
    """The one-line error for an output of the run that ``error`` kept from being written."""
    return CheckpointWriteError(describe(
        str(path), f"cannot be written ({error.strerror or error})",
        "free disk space or make the work dir writable; checkpoints already written are intact",
    ))


def write_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write ``state`` and its content checksum to ``path``, atomically: afterwards ``path`` is either
    absent, the old file, or complete. A failed write leaves no partial file and raises
    :class:`CheckpointWriteError`."""
    path = Path(path)
    payload = {**state, CHECKSUM_KEY: content_digest(state)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        with contextlib.suppress(OSError):  # in a read-only directory it was never created
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_failure(path, error) from error
        raise


def list_checkpoints(directory: Path) -> List[Tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_*.pth`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_stale_temporaries(directory: Path) -> List[Path]:
    """Delete temporary files left by a process killed while saving; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [path for path in directory.iterdir() if _TEMPORARY_NAME.match(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def prune_checkpoints(directory: Path, keep_last: int, written_iteration: int) -> List[Path]:
    """After a run wrote the checkpoint of ``written_iteration``: delete the checkpoints older than it,
    except the ``keep_last - 1`` newest of them; returns the deleted paths.

    Checkpoints of that iteration or later are never touched: another run's, or files a resume skipped
    as unreadable, are not this run's to remove, and the file just written always survives.
    """
    older = [path for iteration, path in list_checkpoints(directory) if iteration < written_iteration]
    doomed = older[: max(len(older) - (keep_last - 1), 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def verify_checksum(state: Mapping, path: Path) -> None:
    """Recompute the content checksum of a loaded checkpoint; :class:`CheckpointError` if it differs.

    A file of the unchecked format (written before checkpoints carried a checksum) passes with a warning.
    """
    if CHECKSUM_KEY not in state and state.get("format") == UNCHECKED_FORMAT:
        logger.warning("%s: written without a content checksum; its contents cannot be verified", path)
        return
    try:
        actual = content_digest(state)
    except TypeError as error:
        raise CheckpointError(describe(str(path), f"is not a training checkpoint ({error})")) from error
    if state.get(CHECKSUM_KEY) != actual:
        raise CheckpointError(describe(
            str(path), "content checksum mismatch: the file was damaged after it was written",
            "resume from an earlier checkpoint (runtime.resume=auto falls back by itself) or copy it again",
        ))


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a training checkpoint (weights only, on the CPU) and verify its checksum;
    :class:`CheckpointError` (one line, naming the file) if it is unusable."""
    path = Path(path)
    try:
        state = load_torch_file(path, what="training checkpoint")
    except InputError as error:
        raise CheckpointError(str(error)) from error
    if not isinstance(state, dict):
        raise CheckpointError(describe(str(path), f"holds {type(state).__name__}, not a training checkpoint"))
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            describe(str(path), f"not a training checkpoint (missing {', '.join(missing)})")
        )
    if state["format"] not in (UNCHECKED_FORMAT, CHECKPOINT_FORMAT):
        raise CheckpointError(describe(
            str(path), f"checkpoint format {state['format']}, this version reads {CHECKPOINT_FORMAT}",
            "use the streampetr-plugin version that wrote it",
        ))
    verify_checksum(state, path)
    return state


def find_latest_checkpoint(directory: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint in ``directory`` that loads and verifies, with its content; unusable ones
    are skipped with a warning. None when there is none."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping checkpoint: %s", error)
    return None


def resume_mismatch(path: Path, what: str, detail: str) -> CheckpointError:
    """The one-line error for resuming from ``path`` when its ``what`` does not fit this run."""
    return CheckpointError(describe(str(path), f"{what} does not fit this run ({detail})", _NEW_RUN_FIX))


def check_model_fits(path: Path, saved: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """:class:`CheckpointError` naming what differs when ``saved`` (a checkpoint's ``state_dict``)
    cannot be loaded strictly into ``model``."""
    expected = model.state_dict()
    shapes = [f"{key}: checkpoint {tuple(saved[key].shape)} vs model {tuple(value.shape)}"
              for key, value in expected.items() if key in saved and saved[key].shape != value.shape]
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    problems = [f"{len(found)} {kind}, e.g. {found[0]}" for kind, found in (
        ("shapes differ", shapes), ("missing", missing), ("unexpected", unexpected)) if found]
    if problems:
        raise resume_mismatch(path, "the model", "; ".join(problems))


def nonfinite_entries(value: Any, prefix: str = "") -> List[str]:
    """Dotted paths of the floating-point tensors and floats inside ``value`` (nested dicts, lists)
    that hold a NaN or an infinity."""
    if isinstance(value, torch.Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return [] if finite else [prefix]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return [] if not isinstance(value, float) or math.isfinite(value) else [prefix]
    return [name for key, item in items
            for name in nonfinite_entries(item, f"{prefix}.{key}" if prefix else str(key))]


def capture_rng_state(device: DeviceHandle) -> Dict[str, Any]:
    """This process's RNG states as plain data (python, numpy, torch CPU, device)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "device": device.rng_state(),
    }


def restore_rng_state(state: Dict[str, Any], device: DeviceHandle) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    device.set_rng_state(state["device"])


def stream_states(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """The detector's stream state (``stream_state.save()``) as CPU tensors; empty for a detector that
    carries none."""
    state = stream_state_of(model)
    return {} if state is None else to_cpu(state.save())


def load_stream_states(
    model: nn.Module, states: Dict[str, Dict[str, torch.Tensor]], device: torch.device
) -> None:
    """Inverse of :func:`stream_states`: ``states`` loaded into the detector's stream state on ``device``."""
    state = stream_state_of(model)
    if state is not None:
        state.load({
            name: {key: value.to(device) for key, value in fields.items()} for name, fields in states.items()
        })
