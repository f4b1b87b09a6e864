"""Rank 0's account of a training run: ``recipe.yaml``, the start-up lines, every ``log_interval``
iterations a log line and a ``metrics.jsonl`` record (loss terms, lr, gradient norm, loss scale, skipped
steps, step and data time, throughput, peak memory, time left), the evaluations' metrics, and the
progress bar."""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.config.loader import dump_recipe
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.training.checkpointing import write_failure
from streampetr_plugin.training.metrics_log import IterationPace, MetricsLog, ProgressBar, format_duration
from streampetr_plugin.training.step import StepResult

logger = logging.getLogger(__name__)


@dataclass
class Interval:
    """Running sums between two log lines."""

    steps: int = 0
    skipped: int = 0
    terms: Dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    finite_norms: int = 0
    step_time: float = 0.0
    data_time: float = 0.0

    def add(self, result: StepResult, step_time: float, data_time: float) -> None:
        self.steps += 1
        self.skipped += int(result.skipped)
        for name, value in result.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        if math.isfinite(result.grad_norm):
            self.grad_norm += result.grad_norm
            self.finite_norms += 1
        self.step_time += step_time
        self.data_time += data_time


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr of the parameters without a multiplier (the heads; the backbone's is x0.1)."""
    groups: List[Dict[str, Any]] = optimizer.param_groups
    plain = [group for group in groups if group.get("lr_mult", 1.0) == 1.0]
    return (plain or groups)[0]["lr"]


class RunLog:
    """Writes the run's record on rank 0 (``is_main``); elsewhere every method does nothing.

    Args:
        recipe: the run's recipe (saved as ``recipe.yaml``, read for ``log_interval`` and the batch size).
        work_dir: the run directory.
        device: the device (its peak memory is logged).
        world_size: processes (for the throughput).
    """

    def __init__(
        self, recipe: Recipe, work_dir: Path, *, device: DeviceHandle, world_size: int, is_main: bool
    ) -> None:
        self.recipe = recipe
        self.work_dir = work_dir
        self.device = device
        self.world_size = world_size
        self.is_main = is_main
        self.metrics: Optional[MetricsLog] = None
        self.pace = IterationPace()

    def open(self) -> None:
        """``recipe.yaml`` and ``metrics.jsonl`` (plus TensorBoard when the recipe asks for it)."""
        if not self.is_main:
            return
        tensorboard_dir = self.work_dir / "tensorboard" if self.recipe.runtime.tensorboard else None
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / "recipe.yaml").write_text(dump_recipe(self.recipe), encoding="utf-8")
            self.metrics = MetricsLog(self.work_dir / "metrics.jsonl", tensorboard_dir=tensorboard_dir)
        except OSError as error:
            raise write_failure(Path(error.filename or self.work_dir), error) from error

    def announce(self, *, adapters_table: str, iteration: int, max_iters: int, iters_per_epoch: int,
                 checkpoint_interval: int, precision: str) -> None:
        """The start-up lines: the device and adapter table, then the run's length and settings."""
        if not self.is_main:
            return
        recipe = self.recipe
        logger.info("%s", adapters_table)
        logger.info(
            "training %s from iteration %d to %d (%d per epoch; batch %d per process, %d process(es)), "
            "checkpoint every %d, precision %s, work dir %s",
            recipe.name, iteration, max_iters, iters_per_epoch, recipe.data.batch_size_per_device,
            self.world_size, checkpoint_interval, precision, self.work_dir,
        )
        ema = recipe.optimization.ema
        if ema.enabled:
            logger.info("evaluating and saving the moving average of the weights (EMA, decay %g)", ema.decay)

    def progress_bar(self, *, total: int, initial: int) -> Optional[ProgressBar]:
        """The bar ``runtime.progress_bar`` asks for (``auto``: on a terminal), on rank 0; else None."""
        setting = self.recipe.runtime.progress_bar
        if not self.is_main or setting == "off" or (setting == "auto" and not sys.stderr.isatty()):
            return None
        return ProgressBar(total=total, initial=initial)

    def interval(
        self, interval: Interval, *, iteration: int, max_iters: int, iters_per_epoch: int, lr: float,
        loss_scale: Optional[float],
    ) -> None:
        """The log line and metrics record of the iterations summed in ``interval``."""
        if not self.is_main:
            return
        steps = max(interval.steps, 1)
        record: Dict[str, Any] = {
            "kind": "train", "iteration": iteration, "epoch": iteration / iters_per_epoch,
        }
        record.update({name: value / steps for name, value in interval.terms.items()})
        record["lr"] = lr
        norms = interval.finite_norms
        record["grad_norm"] = interval.grad_norm / norms if norms else float("nan")
        record["loss_scale"] = loss_scale
        record["skipped_steps"] = interval.skipped
        record["step_time"] = interval.step_time / steps
        record["data_time"] = interval.data_time / steps
        frames = self.world_size * self.recipe.data.batch_size_per_device * steps
        record["samples_per_s"] = frames / max(interval.step_time, 1e-9)
        record["peak_memory_mib"] = self.device.peak_memory_mib()
        self.device.reset_peak_memory()
        if self.metrics is not None:
            self.metrics.write(record)
        self.pace.add(interval.step_time, interval.steps)
        remaining = self.pace.remaining(max_iters - iteration)
        logger.info(
            "iter %d/%d loss %.4f lr %.3e grad_norm %.3f%s %.3f s/it (data %.3f) eta %s mem %.0f MiB",
            iteration, max_iters, record["loss"], record["lr"], record["grad_norm"],
            "" if loss_scale is None else f" scale {loss_scale:g}",
            record["step_time"], record["data_time"], format_duration(remaining), record["peak_memory_mib"],
        )

    def evaluation(self, iteration: int, metrics: Dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write({"kind": "eval", "iteration": iteration, **metrics})

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
