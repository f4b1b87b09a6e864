"""Device selection and the per-device runtime calls the trainer needs (NPU, CUDA, CPU).

Selection (``accelerator.device``): the ``streampetr_select_accelerator`` hook may decide first; an
explicit ``npu`` / ``cuda`` / ``cpu`` is taken as asked (and fails clearly when absent); ``auto`` checks
the NPU before CUDA and falls back to the CPU. It happens in two steps so that the NPU environment can
be prepared before ``torch_npu`` is imported: :func:`candidate_device` looks only at what is installed,
:func:`confirm_device` imports the device runtime and checks a device is really there.

``torch_npu`` is imported here, lazily, and nowhere at package import time. ``torch.npu`` mirrors
``torch.cuda``, so :class:`DeviceHandle` drives both through the same calls.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Tuple

import torch

from streampetr_plugin.errors import RunError

if TYPE_CHECKING:
    from streampetr_plugin.hooks import Hooks

logger = logging.getLogger(__name__)

DISTRIBUTED_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
VISIBLE_DEVICES_VARIABLE = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}

_said_once: set = set()


class DeviceError(RunError):
    """The requested device cannot be used (with what to do about it)."""


def say_once(key: str, message: str, *args: Any) -> None:
    """Log ``message`` at INFO the first time ``key`` is seen in this process."""
    if key not in _said_once:
        _said_once.add(key)
        logger.info(message, *args)


def torch_npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def import_torch_npu() -> Any:
    """``import torch_npu`` (registers the ``npu`` device with torch)."""
    return importlib.import_module("torch_npu")


def npu_availability() -> Tuple[bool, str]:
    """(usable, why not) for the NPU; imports ``torch_npu`` when it is installed."""
    if not torch_npu_installed():
        return False, "torch_npu is not installed"
    try:
        torch_npu = import_torch_npu()
    except Exception as error:  # a broken driver install must fall back, not crash
        return False, f"import torch_npu failed ({type(error).__name__}: {error})"
    if not torch_npu.npu.is_available():
        return False, "torch_npu found no NPU"
    return True, ""


def cuda_availability() -> Tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    return True, ""


def candidate_device(
    requested: str, *, hooks: "Hooks", environ: Optional[Mapping[str, str]] = None
) -> Tuple[str, str]:
    """(device kind, how it was chosen) without importing any device runtime.

    A plugin's ``streampetr_select_accelerator`` (through ``hooks``) decides first; ``auto`` names the NPU
    whenever ``torch_npu`` is installed; :func:`confirm_device` then checks it.
    """
    environ = os.environ if environ is None else environ
    chosen = hooks.select_accelerator(requested=requested, environ=dict(environ))
    if chosen is not None:
        if chosen not in DISTRIBUTED_BACKENDS:
            raise DeviceError(f"streampetr_select_accelerator returned {chosen!r}; expected npu, cuda or cpu")
        return chosen, "chosen by a plugin (streampetr_select_accelerator)"
    if requested != "auto":
        return requested, "accelerator.device"
    if torch_npu_installed():
        return "npu", "auto: torch_npu is installed"
    say_once("no-torch-npu", "torch_npu is not installed: NPU support is off")
    available, why_not = cuda_availability()
    if available:
        return "cuda", "auto: no torch_npu, CUDA available"
    return "cpu", f"auto: no torch_npu, {why_not}"


def confirm_device(candidate: str, how: str) -> Tuple[str, str]:
    """Check the candidate is usable. An explicit choice that is not raises :class:`DeviceError`; an
    ``auto`` NPU candidate without a device falls back to CUDA, then the CPU (said once)."""
    if candidate == "cpu":
        return candidate, how
    check = npu_availability if candidate == "npu" else cuda_availability
    available, why_not = check()
    if available:
        return candidate, how
    if not how.startswith("auto"):
        hint = "install torch_npu and CANN" if candidate == "npu" else "install a CUDA build of torch"
        raise DeviceError(
            f"device {candidate!r} ({how}) is not usable: {why_not}; {hint}, or set accelerator.device"
        )
    say_once("npu-fallback", "NPU not used: %s", why_not)
    cuda_ok, cuda_why_not = cuda_availability()
    if cuda_ok:
        return "cuda", f"auto: {why_not}, CUDA available"
    return "cpu", f"auto: {why_not}, {cuda_why_not}"


def resolve_distributed_backend(requested: str, device: str) -> str:
    """The recipe's ``accelerator.distributed_backend``, or the device's own for ``auto``."""
    return DISTRIBUTED_BACKENDS[device] if requested == "auto" else requested


@dataclass(frozen=True)
class DeviceHandle:
    """One device of the selected kind (``index`` None on the CPU)."""

    kind: str
    index: Optional[int] = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind) if self.index is None else torch.device(self.kind, self.index)

    @property
    def module(self) -> Any:
        """``torch.cuda`` or ``torch.npu`` (None on the CPU)."""
        if self.kind == "cpu":
            return None
        if self.kind == "npu":
            return import_torch_npu().npu
        return torch.cuda

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"cpu ({torch.get_num_threads()} threads)"
        return f"{self.kind}:{self.index} ({self.module.get_device_name(self.index)})"

    def device_count(self) -> int:
        return 0 if self.module is None else int(self.module.device_count())

    def activate(self) -> None:
        """Make this the current device of the process (before any allocation on it)."""
        if self.module is not None:
            self.module.set_device(self.index)

    def synchronize(self) -> None:
        if self.module is not None:
            self.module.synchronize()

    def rng_state(self) -> Optional[torch.Tensor]:
        return None if self.module is None else self.module.get_rng_state(self.index)

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        if self.module is not None and state is not None:
            self.module.set_rng_state(state, self.index)

    def reset_peak_memory(self) -> None:
        if self.module is not None:
            self.module.reset_peak_memory_stats(self.index)

    def peak_memory_mib(self) -> float:
        """Peak allocated device memory; on the CPU the process's peak resident set size."""
        if self.module is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
        return self.module.max_memory_allocated(self.index) / 2**20


def device_for_local_rank(kind: str, local_rank: int) -> DeviceHandle:
    """The device this process drives; a clear error when ``LOCAL_RANK`` exceeds the visible devices."""
    if kind == "cpu":
        return DeviceHandle("cpu")
    handle = DeviceHandle(kind, local_rank)
    count = handle.device_count()
    if local_rank >= count:
        variable = VISIBLE_DEVICES_VARIABLE[kind]
        visible = os.environ.get(variable)
        shown = f"{variable}={visible}" if visible is not None else f"{variable} unset"
        raise DeviceError(
            f"LOCAL_RANK={local_rank} but only {count} {kind.upper()} device(s) are visible ({shown}); "
            f"start at most {count} processes per node (torchrun --nproc-per-node {count})"
        )
    return handle
