"""CPU adapters.

* ``cpu_threads``: intra-op threads = the CPUs this process may use divided by the processes on the
  node, unless ``OMP_NUM_THREADS`` was exported (torchrun exports 1 when it starts several processes);
* ``cpu_foreach_adamw``: ``torch.optim.AdamW(foreach=True)`` through the AdamW factory;
* ``cpu_glibc_malloc``: glibc's ``mallopt`` at start-up, so freed tensor memory stays in the process
  instead of going back to the OS and faulting in again, page by page, at the next step;
* ``cpu_channels_last`` (model phase, off by default): the image backbone's weights, and so its
  activations, in channels-last layout for oneDNN's convolutions, in training and evaluation
  (docs/benchmarks.md has the measurements; compare on your machine with ``streampetr bench --variants
  channels_last`` and ``streampetr bench --inference --backend torch-cpu-levers``).

gloo is the CPU process-group backend (:data:`streampetr_plugin.adapters.device.DISTRIBUTED_BACKENDS`).
"""
from __future__ import annotations

import ctypes
import os
from typing import ClassVar, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from threadpoolctl import threadpool_info, threadpool_limits

from streampetr_plugin.adapters.base import Adapter, AdapterContext, AdapterResult, Phase


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CpuThreadsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_threads: Optional[int] = Field(
        None, ge=1, description="Intra-op threads per process; null: usable CPUs / processes on this node."
    )


class CpuThreads(Adapter):
    """A thread count that does not oversubscribe the CPUs when several processes share them."""

    name: ClassVar[str] = "cpu_threads"
    devices: ClassVar[Tuple[str, ...]] = ("cpu",)
    phase: ClassVar[Phase] = Phase.RUNTIME

    def __init__(self, *, num_threads: Optional[int] = None) -> None:
        self.num_threads = num_threads

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        exported = context.environ.get("OMP_NUM_THREADS")
        if self.num_threads is None and exported is not None:
            return False, f"kept the exported OMP_NUM_THREADS={exported} ({torch.get_num_threads()} threads)"
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        threads = self.num_threads or max(1, usable_cpus() // max(1, context.local_world_size))
        torch.set_num_threads(threads)
        # numpy's BLAS (the data pipeline's small matrix products) keeps a pool of one thread per core
        # whose idle workers spin in sched_yield: on the 2-core demo that was 11 s of system time per
        # 100 iterations, gone with the same limit as torch's.
        threadpool_limits(limits=threads, user_api="blas")
        blas = sorted({pool["internal_api"] for pool in threadpool_info() if pool["user_api"] == "blas"})
        reason = f"torch.set_num_threads({threads})"
        if blas:
            reason += f", {'/'.join(blas)} threads {threads}"
        return AdapterResult.applied(reason)


class CpuForeachAdamW(Adapter):
    """``torch.optim.AdamW(foreach=True)``: multi-tensor updates."""

    name: ClassVar[str] = "cpu_foreach_adamw"
    devices: ClassVar[Tuple[str, ...]] = ("cpu",)
    phase: ClassVar[Phase] = Phase.OPTIMIZER

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        return context.adamw_left_to_adapters()

    def apply(self, context: AdapterContext) -> AdapterResult:
        context.optimizer_options["implementation"] = "foreach"
        return AdapterResult.applied("torch.optim.AdamW(foreach=True)")


# glibc's malloc.h parameter numbers for mallopt().
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
GLIBC_MALLOC_TUNABLES = "glibc.malloc."


def load_glibc() -> Optional[ctypes.CDLL]:
    """The C library this process runs on, if it is glibc (only glibc has ``gnu_get_libc_version``)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows has no handle for the running program
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


class CpuGlibcMallocParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trim_threshold_mib: int = Field(
        1024, ge=0, le=2047,
        description="Free memory at the top of the heap that glibc keeps instead of returning it to the OS.",
    )
    mmap_max: int = Field(
        0, ge=0,
        description="Most blocks glibc maps on their own (unmapped when freed, so faulted in anew on reuse).",
    )


class CpuGlibcMalloc(Adapter):
    """Keep freed memory in the process: a training step frees and reallocates the same large tensors,
    and by default glibc unmaps (or trims) them after each use, so every step faults them in again."""

    name: ClassVar[str] = "cpu_glibc_malloc"
    devices: ClassVar[Tuple[str, ...]] = ("cpu",)
    phase: ClassVar[Phase] = Phase.ENVIRONMENT

    def __init__(self, *, trim_threshold_mib: int = 1024, mmap_max: int = 0) -> None:
        self.trim_threshold_mib = trim_threshold_mib
        self.mmap_max = mmap_max

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        exported = context.environ.get("GLIBC_TUNABLES", "")
        if GLIBC_MALLOC_TUNABLES in exported:
            return False, f"kept the exported GLIBC_TUNABLES={exported}"
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        libc = load_glibc()
        if libc is None:
            return AdapterResult.skipped("not running on glibc (mallopt is glibc's)")
        settings = (("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, self.trim_threshold_mib << 20),
                    ("M_MMAP_MAX", M_MMAP_MAX, self.mmap_max))
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        rejected = [name for name, number, value in settings if libc.mallopt(number, value) != 1]
        if rejected:
            return AdapterResult.failed(f"mallopt rejected {', '.join(rejected)}")
        return AdapterResult.applied(", ".join(f"mallopt({name}, {value})" for name, _, value in settings))


class CpuChannelsLast(Adapter):
    """The image backbone in channels-last layout (oneDNN's preferred convolution layout), for training
    and inference: a model-phase adapter, so it applies wherever a model is built."""

    name: ClassVar[str] = "cpu_channels_last"
    devices: ClassVar[Tuple[str, ...]] = ("cpu",)
    phase: ClassVar[Phase] = Phase.MODEL
    enabled_by_default: ClassVar[bool] = False

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if context.model is None or getattr(context.model, "img_backbone", None) is None:
            return False, "the model has no img_backbone"
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        context.model.img_backbone.to(memory_format=torch.channels_last)
        return AdapterResult.applied("img_backbone in channels_last")
