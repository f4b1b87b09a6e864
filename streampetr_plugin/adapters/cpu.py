"""CPU adapters.

* ``cpu_threads``: intra-op threads = the CPUs this process may use divided by the processes on the
  node, unless ``OMP_NUM_THREADS`` was exported (torchrun exports 1 when it starts several processes);
* ``cpu_foreach_adamw``: ``torch.optim.AdamW(foreach=True)`` through the AdamW factory.

gloo is the CPU process-group backend (:data:`streampetr_plugin.adapters.device.DISTRIBUTED_BACKENDS`).
"""
from __future__ import annotations

import os
from typing import ClassVar, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field

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
        return AdapterResult.applied(f"torch.set_num_threads({threads})")


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
