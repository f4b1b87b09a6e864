"""Measuring instruments: step timing, peak memory, FLOP counting, and what the device is.

* Step times are wall-clock seconds around one step with the device synchronised before and after,
  so asynchronous kernels of a step are charged to that step.
* Peak memory is the device's peak allocated memory on CUDA / NPU; on the CPU it is the process's
  peak resident set size (``getrusage``), which Linux lets us reset through ``/proc/self/clear_refs``
  so that each measured configuration gets its own peak.
* FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications and
  convolutions, forward and backward). While counting, every attention module runs the explicit
  ``math`` backend, because the counter has no formula for fused kernels such as PyTorch's CPU flash
  attention or ``torch_npu.npu_fusion_attention``; the count is the same for every backend.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from streampetr_plugin.adapters.cpu import usable_cpus
from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.models.layers.attention import math_attention
from streampetr_plugin.models.layers.multihead_attention import MultiheadAttentionCore

logger = logging.getLogger(__name__)

CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # clear_refs command: reset the peak resident set size (Linux >= 4.0)
PROGRESS_INTERVAL_S = 10.0


class StepProgress:
    """INFO lines while steps run (a CPU step of a full-size recipe takes half a minute):
    ``<label>: warm-up 1/2 31.2 s``, ``<label>: step 3/10 30.9 s``; the first step, then at most one
    line every ``interval_s`` seconds, and the last step."""

    def __init__(
        self, label: str, *, steps: int, warmup: int, interval_s: float = PROGRESS_INTERVAL_S
    ) -> None:
        self.label, self.steps, self.warmup, self.interval_s = label, steps, warmup, interval_s
        self._last_line_at = -math.inf

    def step_done(self, index: int, seconds: float) -> None:
        """Step ``index`` (warm-up steps first, counting from 0) took ``seconds``."""
        now = time.monotonic()
        last = index == self.warmup + self.steps - 1
        if not last and now - self._last_line_at < self.interval_s:
            return
        self._last_line_at = now
        if index < self.warmup:
            logger.info("%s: warm-up %d/%d %.1f s", self.label, index + 1, self.warmup, seconds)
        else:
            logger.info("%s: step %d/%d %.1f s", self.label, index - self.warmup + 1, self.steps, seconds)


def time_steps(
    step: Callable[[Any], Any],
    prepare: Callable[[int], Any],
    *,
    steps: int,
    warmup: int,
    device: DeviceHandle,
    label: str = "bench",
) -> Tuple[List[float], List[float]]:
    """(wall seconds, process CPU seconds) of each of ``steps`` timed calls ``step(prepare(i))`` after
    ``warmup`` untimed ones; ``prepare(i)`` builds the input of step ``i`` and is not timed. Progress
    is logged under ``label`` (:class:`StepProgress`).

    The CPU seconds (user + system, all threads of this process) change little when other processes
    share the CPUs, unlike the wall time; on an accelerator they are the host's share of the step.
    """
    progress = StepProgress(label, steps=steps, warmup=warmup)
    wall_times, cpu_times = [], []
    for index in range(warmup + steps):
        inputs = prepare(index)
        device.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(inputs)
        device.synchronize()
        seconds = time.perf_counter() - start
        if index >= warmup:
            wall_times.append(seconds)
            cpu_times.append(time.process_time() - cpu_start)
        progress.step_done(index, seconds)
    return wall_times, cpu_times


def reset_peak_memory(device: DeviceHandle) -> bool:
    """Start a new peak-memory window; False when the CPU's peak RSS could not be reset (the peak
    then covers the whole process so far)."""
    if device.kind != "cpu":
        device.reset_peak_memory()
        return True
    try:
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


def peak_memory_kind(device: DeviceHandle, reset_worked: bool = True) -> str:
    """What :meth:`DeviceHandle.peak_memory_mib` measures on this device, in words."""
    if device.kind != "cpu":
        return f"{device.kind} max_memory_allocated"
    return "process peak RSS" + ("" if reset_worked else " since process start (could not reset)")


@contextlib.contextmanager
def counting_setup(model: nn.Module) -> Iterator[None]:
    """Attention through the ``math`` backend and activation checkpointing off, restored afterwards:
    the counted FLOPs are the model's (no recomputation), whatever kernels and memory settings run."""
    modules = list(model.modules())
    attention = [(module, module.backend, module.attend) for module in modules
                 if isinstance(module, MultiheadAttentionCore)]
    checkpointed = [
        (module, module.with_cp) for module in modules if isinstance(getattr(module, "with_cp", None), bool)
    ]
    try:
        for module, _, _ in attention:
            module.use_backend("math", math_attention)
        for module, _ in checkpointed:
            module.with_cp = False
        yield
    finally:
        for module, backend, attend in attention:
            module.use_backend(backend, attend)
        for module, with_cp in checkpointed:
            module.with_cp = with_cp


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs of everything ``run()`` executes (forward, and backward when it calls it)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: DeviceHandle) -> Dict[str, Any]:
    """The device in words and numbers: ``kind``, ``name``, ``torch`` version and, on the CPU, ``cores``,
    ``threads`` and the 1-minute ``load_average`` when measuring started."""
    info: Dict[str, Any] = {"kind": device.kind, "torch": torch.__version__}
    if device.kind == "cpu":
        cores = usable_cpus()
        info.update(
            name=f"{cpu_model_name()} ({cores} cores, {torch.get_num_threads()} threads)",
            cores=cores,
            threads=torch.get_num_threads(),
            load_average=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        )
    else:
        info["name"] = device.describe()
    return info
