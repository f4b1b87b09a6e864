"""``streampetr bench --data``: how fast the recipe's training input pipeline delivers batches.

The training dataset and loader are built exactly as the trainer builds them (``build_dataset``,
``build_dataloader`` with the streaming sampler, the recipe's batch size). Two measurements:

* one process (``num_workers=0``): seconds per collated batch in this process, i.e. what one worker
  delivers (image decoding, augmentation, collation);
* the recipe's ``num_workers``: seconds between batches handed out by the loader. Workers deliver in
  bursts, so throughput is taken over the total time; the first ``max(warmup, num_workers)`` batches
  (worker start-up) are not timed.

A loader that is slower than the training step makes the step wait (the aim: data time under 5% of
step time), so the report gives the shortest step the loader can keep fed.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any, List, Optional, Tuple

from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.bench.measure import StepProgress, peak_memory_kind, reset_peak_memory
from streampetr_plugin.bench.report import DataPipelineResult, PhaseResult, StepTimes
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.plugins import Registries

logger = logging.getLogger(__name__)


def time_batches(
    loader: Any, *, steps: int, warmup: int, label: str = "bench data"
) -> Tuple[List[float], List[float]]:
    """(wall seconds, this process's CPU seconds) spent waiting for each of ``steps`` batches after
    ``warmup`` untimed ones; progress is logged under ``label``."""
    from streampetr_plugin.data.loader import endless_batches

    batches = endless_batches(loader, epoch_sampler=loader.batch_sampler)  # as the trainer draws them
    progress = StepProgress(label, steps=steps, warmup=warmup)
    wall_times, cpu_times = [], []
    for index in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        next(batches)
        seconds = time.perf_counter() - start
        if index >= warmup:
            wall_times.append(seconds)
            cpu_times.append(time.process_time() - cpu_start)
        progress.step_done(index, seconds)
    return wall_times, cpu_times


def _phase(
    times: List[float], cpu_times: Optional[List[float]], batch_size: int, reset_worked: bool
) -> PhaseResult:
    host_cpu = DeviceHandle("cpu")
    step_time = StepTimes.from_times(times)
    return PhaseResult(
        batch_size=batch_size,
        step_time_s=step_time,
        samples_per_s=batch_size * len(times) / sum(times),
        peak_memory_mib=host_cpu.peak_memory_mib(),
        peak_memory_kind=peak_memory_kind(host_cpu, reset_worked) + " of the main process",
        flops_per_sample=None,
        tflops_per_s=None,
        cpu_s_per_step=None if cpu_times is None else statistics.median(cpu_times),
    )


def bench_data_pipeline(
    recipe: Recipe, registries: Registries, *, steps: int, warmup: int
) -> DataPipelineResult:
    """Time the training input pipeline of ``recipe``, its dataset from ``registries`` (see the module
    docstring)."""
    from streampetr_plugin.data.build import build_dataset
    from streampetr_plugin.data.loader import build_dataloader

    data = recipe.data
    host_cpu = DeviceHandle("cpu")
    logger.info("bench data: building the training dataset of %s", recipe.name)
    dataset = build_dataset(recipe, registries, training=True)
    batch_size = data.batch_size_per_device

    def loader(num_workers: int) -> Any:
        return build_dataloader(
            dataset, batch_size=batch_size, num_workers=num_workers, rank=0, world_size=1,
            seed=recipe.runtime.seed, training=True,
        )

    reset_worked = reset_peak_memory(host_cpu)
    times, cpu_times = time_batches(loader(0), steps=steps, warmup=warmup, label="bench data, one process")
    single = _phase(times, cpu_times, batch_size, reset_worked)
    with_workers = None
    workers = data.num_workers
    if workers > 0:
        reset_worked = reset_peak_memory(host_cpu)
        times, _ = time_batches(loader(workers), steps=steps, warmup=max(warmup, workers),
                                label=f"bench data, {workers} workers")
        with_workers = _phase(times, None, batch_size, reset_worked)  # the work is in the workers
    throughput = (with_workers or single).samples_per_s
    options = data.train.options()
    return DataPipelineResult(
        dataset=f"{data.train.type} ({options.get('root', '?')}, {options.get('train_info', '?')})",
        num_samples=len(dataset),
        batch_size=batch_size,
        num_workers=workers,
        single_process=single,
        with_workers=with_workers,
        samples_per_s_per_worker=throughput / max(1, workers),
        max_steps_per_s=throughput / batch_size,
    )
