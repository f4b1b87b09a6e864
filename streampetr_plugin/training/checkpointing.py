"""Training checkpoints: atomic, checksummed writes, keep-last-k, finding the newest usable one, RNG states.

A checkpoint is ``<work_dir>/checkpoints/iter_<iteration>.pth``, one ``torch.save`` of a dict::

    state_dict       the model's weights (reference key names; also what ``load_from``, ``streampetr eval``
                     and export read): with ``optimization.ema`` on, the moving average of the weights
    trained_state_dict   only with ``optimization.ema`` on: the weights the optimiser steps (resume reads them)
    ema              only with ``optimization.ema`` on: {"decay", "updates"}
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.checksum import (
    CHECKSUM_KEY,
    UNCHECKED_FORMAT,
    CheckpointError,
    content_digest,
    verify_checksum,
)
from streampetr_plugin.errors import InputError, RunError, describe
from streampetr_plugin.models.stream_state import stream_state_of
from streampetr_plugin.safe_loading import load_torch_file
from streampetr_plugin.training.distributed import (
    DistributedEnv,
    all_gather_objects,
    all_reduce_sum,
    broadcast_buffers,
)
from streampetr_plugin.training.ema import WeightEMA

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^iter_(\d+)\.pth$")
_TEMPORARY_NAME = re.compile(r"^\.iter_\d+\.pth\.\d+\.tmp$")
REQUIRED_KEYS = ("format", "state_dict", "iteration", "optimizer")
_NEW_RUN_FIX = (
    "the recipe changed since it was written: train in a new runtime.work_dir, or resume with that recipe"
)


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


class NonFiniteLossError(RunError):
    """Training went non-finite: too many steps in a row skipped for a non-finite loss or gradient, or a
    checkpoint due while the weights or optimiser state hold a NaN or an infinity."""


class WorkDirNotEmptyError(InputError):
    """``runtime.resume=none`` in a work dir that already holds checkpoints."""


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def data_position_of(loader: Any) -> Any:
    """What reports and restores the training data position: the loader itself when it can (it knows
    what was consumed, its workers prefetch ahead of the sampler), else its (batch) sampler, else None."""
    for candidate in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if all(callable(getattr(candidate, method, None)) for method in ("state_dict", "load_state_dict")):
            return candidate
    return None


def find_resume_checkpoint(
    resume: Optional[str], directory: Path, dist_env: DistributedEnv
) -> Optional[Tuple[Dict[str, Any], Path]]:
    """``(state, path)`` to continue from, per ``runtime.resume`` (``none`` / ``auto`` / a path); every rank
    reads the file rank 0 chose (multi-node resume needs the work dir on a shared filesystem). Collective.

    ``none`` refuses a directory that already holds checkpoints (:class:`WorkDirNotEmptyError`): starting
    afresh beside them would mix two runs in one directory. ``auto`` removes partial files of an
    interrupted save and takes the newest checkpoint that loads and verifies.
    """
    is_main = dist_env.is_main
    if resume in ("none", "", None):
        existing = [path.name for _, path in list_checkpoints(directory)] if is_main else None
        existing = all_gather_objects(existing)[0]
        if existing:
            raise WorkDirNotEmptyError(describe(
                str(directory),
                f"holds {len(existing)} checkpoint(s) ({existing[0]} .. {existing[-1]}) and "
                "runtime.resume=none would start a new run among them",
                "runtime.resume=auto continues from the newest; to start afresh, set a new "
                "runtime.work_dir or move the checkpoints away",
            ))
        return None
    if resume != "auto":
        return load_checkpoint(Path(resume)), Path(resume)
    if is_main:
        removed = remove_stale_temporaries(directory)
        if removed:
            logger.info("removed %d partial checkpoint file(s) left by an interrupted save", len(removed))
    found = find_latest_checkpoint(directory) if is_main else None
    chosen = all_gather_objects(None if found is None else str(found[0]))[0]
    if chosen is None:
        skipped = [path.name for _, path in list_checkpoints(directory)] if is_main else []
        if skipped:
            logger.warning(
                "NO USABLE CHECKPOINT in %s: skipped %s (see the warnings above); training starts from "
                "iteration 0 and leaves those files in place", directory, ", ".join(skipped),
            )
        return None
    if found is not None:
        return found[1], found[0]
    return load_checkpoint(Path(chosen)), Path(chosen)


@dataclass
class TrainingState:
    """What a checkpoint holds of a run and a resume restores: the model (unwrapped), the optimiser, the
    loss scaler, the training data position (``sampler``: anything with ``state_dict`` /
    ``load_state_dict``, or None), the moving average of the weights (``ema``, None when off), the
    streams, the RNG states and the iteration."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[Any]
    sampler: Optional[Any]
    device: DeviceHandle
    dist_env: DistributedEnv
    ema: Optional[WeightEMA] = None
    iteration: int = 0

    def load(self, state: Dict[str, Any], path: Path) -> Optional[Dict[str, Any]]:
        """Restore ``state`` (read from ``path``); returns this rank's RNG states, to restore once the
        training loader's iterator exists (None when the checkpoint was written by another number of
        processes: data order, streams and RNG then start afresh)."""
        trained = state.get("trained_state_dict", state["state_dict"])
        check_model_fits(path, trained, self.model)
        self.model.load_state_dict(trained)
        if self.ema is not None:
            if "ema" in state:
                self.ema.load(state["state_dict"], updates=int(state["ema"]["updates"]), model=self.model)
            elif self.dist_env.is_main:
                logger.warning("%s holds no moving average of the weights: it starts from the resumed ones", path)
        current = qualified_name(type(self.optimizer))
        if state.get("optimizer_class", current) == current:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, IndexError) as error:
                raise resume_mismatch(path, "the optimiser state", str(error).split("\n")[0]) from error
        else:
            logger.warning(
                "%s was written with optimiser %s, this run uses %s: optimiser moments start afresh",
                path, state["optimizer_class"], current,
            )
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        dist_env = self.dist_env
        if state.get("world_size") != dist_env.world_size:
            if dist_env.is_main:
                logger.warning(
                    "%s was written by %s processes, this run has %d: data order, streams and RNG start "
                    "afresh", path, state.get("world_size"), dist_env.world_size,
                )
            return None
        rank = dist_env.rank
        if self.sampler is not None and state["sampler"][rank] is not None:
            try:
                self.sampler.load_state_dict(state["sampler"][rank])
            except (ValueError, KeyError, TypeError) as error:
                detail = str(error).split("\n")[0]
                raise resume_mismatch(path, "the data sampler state", detail) from error
        load_stream_states(self.model, state["streams"][rank], self.device.torch_device)
        return state["rng"][rank]

    def refuse_nonfinite(self, last_good: Optional[Path]) -> None:
        """:class:`NonFiniteLossError` when the weights, buffers or optimiser state hold a NaN or an
        infinity (e.g. a damaged optimiser moment turned finite-loss steps into NaN weights); the
        decision is summed over ranks so that all of them stop together. Collective."""
        watched = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()["state"]}
        if self.ema is not None:
            watched["ema"] = self.ema.averaged_state_dict(self.model)
        bad = nonfinite_entries(watched)
        count = torch.tensor([float(len(bad))], device=self.device.torch_device)
        if all_reduce_sum(count).item() == 0:
            return
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteLossError(describe(
            f"iteration {self.iteration}",
            f"not saving a checkpoint: the training state is not finite ({shown or 'on another rank'}); "
            f"last good checkpoint: {last_good or 'none'}",
            "resume from the last good checkpoint with a lower learning rate, or check the data and the "
            "checkpoint it was resumed from",
        ))

    def save(
        self, directory: Path, *, run_facts: Dict[str, Any], keep_last: int, last_good: Optional[Path]
    ) -> Path:
        """Write the checkpoint of the current iteration (collective: call it on every rank); returns its
        path.

        Every rank first takes rank 0's buffers, so the file holds what each rank continues with.
        ``run_facts`` (the recipe as plain data, the schedule's type, the plugin versions) are saved as
        they are. Raises :class:`NonFiniteLossError` instead of writing non-finite weights, buffers or
        optimiser state, and :class:`CheckpointWriteError` on every rank when rank 0 cannot write the file.
        """
        broadcast_buffers(self.model)
        self.refuse_nonfinite(last_good)
        sampler_state = self.sampler.state_dict() if self.sampler is not None else None
        per_rank = all_gather_objects(
            {"sampler": sampler_state, "streams": stream_states(self.model),
             "rng": capture_rng_state(self.device)}
        )
        path = checkpoint_path(directory, self.iteration)
        failure: Optional[CheckpointWriteError] = None
        if self.dist_env.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "state_dict": to_cpu(self.model.state_dict()),
                "optimizer": to_cpu(self.optimizer.state_dict()),
                "optimizer_class": qualified_name(type(self.optimizer)),
                "scheduler": {"type": run_facts["scheduler_type"], "iteration": self.iteration},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "iteration": self.iteration,
                "world_size": self.dist_env.world_size,
                "sampler": [item["sampler"] for item in per_rank],
                "streams": [item["streams"] for item in per_rank],
                "rng": [item["rng"] for item in per_rank],
                "recipe": run_facts["recipe"],
                "plugin_versions": run_facts["plugin_versions"],
            }
            if self.ema is not None:
                # What users load (eval, export, load_from) is the average; a resume reads the trained weights.
                state.update(trained_state_dict=state["state_dict"], ema=self.ema.state(),
                             state_dict=to_cpu(self.ema.averaged_state_dict(self.model)))
            try:
                write_checkpoint(state, path)
            except CheckpointWriteError as error:
                failure = error
            else:
                prune_checkpoints(directory, keep_last, self.iteration)
                logger.info("saved %s", path)
        # Rank 0's outcome, on every rank: a failed write stops them all instead of leaving them waiting.
        outcome = all_gather_objects(None if failure is None else str(failure))[0]
        if outcome is not None:
            raise failure or CheckpointWriteError(outcome)
        return path


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
