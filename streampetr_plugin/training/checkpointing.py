"""Training checkpoints: atomic writes, keep-last-k, finding the newest complete one, RNG states.

A checkpoint is ``<work_dir>/checkpoints/iter_<iteration>.pth``, one ``torch.save`` of a dict::

    state_dict       the model's weights (reference key names; also what ``load_from`` reads)
    optimizer        optimiser state;       optimizer_class   its qualified class name
    scheduler        {"type", "iteration"}  (the schedule is a function of the iteration)
    scaler           loss-scaler state or None
    iteration        completed training iterations
    sampler          per rank: the training sampler's state_dict() (position, for resume)
    streams          per rank: the detector's streaming memory (so a resumed run continues its streams)
    rng              per rank: python, numpy, torch and device RNG states
    recipe           the resolved recipe (plain data);  plugin_versions  plugin name -> version
    world_size, format

Everything in it is plain data and tensors, so it loads with ``torch.load(..., weights_only=True)``.
It is written to a hidden temporary file in the same directory, flushed to disk and renamed over the
final name, so a process killed mid-write never leaves a truncated ``iter_*.pth`` behind; a file that
is corrupt anyway (copied partially, disk trouble) is skipped with a warning when resuming.
"""
from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from streampetr_plugin.adapters.device import DeviceHandle

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pth$")
_TEMPORARY_NAME = re.compile(r"^\.iter_\d+\.pth\.\d+\.tmp$")
REQUIRED_KEYS = ("format", "state_dict", "iteration", "optimizer")


class CheckpointError(RuntimeError):
    """A file that is not a usable training checkpoint."""


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


def save_atomic(state: Dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that ``path`` is either absent, the old file, or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


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


def prune_checkpoints(directory: Path, keep_last: int) -> List[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns the deleted paths."""
    doomed = [path for _, path in list_checkpoints(directory)[:-keep_last]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a training checkpoint (weights only, on the CPU); :class:`CheckpointError` if unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, I/O error: all mean "not usable"
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds {type(state).__name__}, not a training checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format']}, this version reads {CHECKPOINT_FORMAT}"
        )
    return state


def find_latest_checkpoint(directory: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint in ``directory`` that loads, with its content; unreadable ones are skipped
    with a warning. None when there is none."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping checkpoint: %s", error)
    return None


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


def _stream_memories(model: nn.Module) -> Dict[str, Any]:
    """The model's streaming memories (``module.memory`` with ``save()`` / ``load()`` / ``reset()``) by
    module name, e.g. ``pts_bbox_head`` for the StreamPETR head's memory queue."""
    found = {}
    for name, module in model.named_modules():
        memory = getattr(module, "memory", None)
        if all(callable(getattr(memory, method, None)) for method in ("save", "load", "reset")):
            found[name] = memory
    return found


def stream_states(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every streaming memory of ``model`` as CPU tensors (empty dict for an empty memory)."""
    return {name: to_cpu(memory.save()) for name, memory in _stream_memories(model).items()}


def load_stream_states(
    model: nn.Module, states: Dict[str, Dict[str, torch.Tensor]], device: torch.device
) -> None:
    """Inverse of :func:`stream_states`; memories absent or empty in ``states`` are reset."""
    for name, memory in _stream_memories(model).items():
        fields = states.get(name) or {}
        if fields:
            memory.load({key: value.to(device) for key, value in fields.items()})
        else:
            memory.reset()
