"""The training loop: one recipe, one process or many (torchrun), NPU, CUDA or CPU.

Set-up (:meth:`Trainer.setup`): the process layout from torchrun's environment, the device and its
adapters (:func:`~streampetr_plugin.training.startup.select_device`), the process group (HCCL / NCCL /
gloo), the checkpoint to resume from (``runtime.resume``), seeds, the model (with the ``load_from``
weights unless resuming) on its device with its adapters, the DDP wrapper (``find_unused_parameters=False``,
no buffer broadcast before each forward, plus adapter options; rank 0's buffers are broadcast before
every evaluation and checkpoint instead), the optimiser, the data, the iteration plan and lr schedule,
the resumed state, the start-up log, and when starting afresh the geometric warm start if the recipe
asks for it. :meth:`Trainer.train` then calls ``streampetr_pre_train``, iterates, evaluates and
checkpoints on the way, and calls ``streampetr_post_train`` (also after an error).

One iteration is :class:`~streampetr_plugin.training.step.TrainStep` after the lr of every group is set
for it (the schedule is per iteration). A non-finite loss or gradient skips the step;
``runtime.max_nonfinite_steps`` skipped steps in a row stop the run with :class:`NonFiniteLossError`, and
so does a checkpoint due while the weights, buffers or optimiser state hold a NaN or an infinity: such a
checkpoint is never written (:mod:`streampetr_plugin.training.checkpointing`).
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, MutableMapping, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from streampetr_plugin.adapters.base import AdapterRecord
from streampetr_plugin.adapters.device import DeviceHandle, resolve_distributed_backend
from streampetr_plugin.config.loader import recipe_to_dict
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.data.build import build_dataset
from streampetr_plugin.data.collate import collate_frames
from streampetr_plugin.data.loader import build_dataloader, endless_batches
from streampetr_plugin.errors import describe
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.training import distributed
from streampetr_plugin.training.batches import move_to_device
from streampetr_plugin.training.checkpointing import (
    CHECKPOINT_DIR,
    NonFiniteLossError,
    TrainingState,
    find_resume_checkpoint,
    nonfinite_entries,
    restore_rng_state,
)
from streampetr_plugin.training.distributed import DistributedEnv
from streampetr_plugin.training.evaluation import (
    EvaluationOutputs,
    Evaluator,
    collect_predictions,
    default_evaluator,
    merge_predictions,
    save_evaluation_outputs,
    stream_starts,
    tracking_evaluator,
)
from streampetr_plugin.training.geometric_warm_start import run_geometric_warm_start
from streampetr_plugin.training.metrics_log import ProgressBar
from streampetr_plugin.training.run_log import Interval, RunLog
from streampetr_plugin.training.startup import (
    build_device_model,
    build_run_optimizer,
    iteration_plan,
    select_device,
)
from streampetr_plugin.training.step import StepResult, TrainStep

logger = logging.getLogger(__name__)

LoaderFactory = Callable[..., Any]


@dataclass
class TrainingContext:
    """What the ``streampetr_pre_train`` / ``streampetr_post_train`` hooks receive.

    ``model`` is the unwrapped detector on its device. ``stop_reason`` is None after a complete run,
    else the error that stopped it.
    """

    recipe: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: DeviceHandle
    dist_env: DistributedEnv
    work_dir: Path
    iters_per_epoch: int
    max_iters: int
    iteration: int = 0
    adapters: List[AdapterRecord] = field(default_factory=list)
    eval_metrics: Dict[str, Any] = field(default_factory=dict)
    stop_reason: Optional[str] = None


@dataclass
class TrainResult:
    """The outcome of :meth:`Trainer.train` (evaluation metrics, metrics file and evaluation outputs only
    on rank 0)."""

    iteration: int
    eval_metrics: Dict[str, Any]
    last_checkpoint: Optional[Path]
    work_dir: Optional[Path] = None
    metrics_file: Optional[Path] = None
    evaluation: Optional[EvaluationOutputs] = None  # the last evaluation's directory and picture


def _sampler_of(loader: Any) -> Any:
    """What reports and restores the training data position: the loader itself when it can (it knows
    what was consumed, its workers prefetch ahead of the sampler), else its (batch) sampler, else None."""
    for candidate in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if all(callable(getattr(candidate, method, None)) for method in ("state_dict", "load_state_dict")):
            return candidate
    return None


def _no_buffer_broadcast() -> Dict[str, bool]:
    """DDP's switch for "do not broadcast buffers before each forward" (the reference's
    ``broadcast_buffers=False``), under the name this torch version uses."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class Trainer:
    """Trains one recipe (see the module docstring for the order of things).

    Args:
        recipe: a validated recipe (``load_recipe``).
        host: the plugin host whose components and hooks the run uses.
        environ: the process environment (default ``os.environ``); adapters write their variables here.
        loader_factory: ``(dataset, *, batch_size, num_workers, rank, world_size, seed, training) ->
            DataLoader``; default ``streampetr_plugin.data.loader.build_dataloader``.
        evaluator: ``(predictions by sample token, val dataset, output dir) -> metrics``; default
            :func:`default_evaluator`.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        host: PluginHost,
        environ: Optional[MutableMapping[str, str]] = None,
        loader_factory: Optional[LoaderFactory] = None,
        evaluator: Optional[Evaluator] = None,
    ) -> None:
        self.recipe = recipe
        self.host = host
        self.environ = os.environ if environ is None else environ
        self._loader_factory = loader_factory or build_dataloader
        self._evaluator = evaluator or default_evaluator
        self.work_dir = Path(recipe.work_dir())
        self.checkpoint_dir = self.work_dir / CHECKPOINT_DIR
        self._nonfinite_streak = 0
        self._val_loader: Any = None
        self._val_dataset: Any = None
        self._resume_rng: Optional[Dict[str, Any]] = None
        self._owns_process_group = False
        self._last_checkpoint: Optional[Path] = None
        self._last_evaluation: Optional[EvaluationOutputs] = None
        self._is_set_up = False

    @property
    def iteration(self) -> int:
        """Completed training iterations (the training state's, saved with it)."""
        return self.state.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.state.iteration = value

    def setup(self) -> None:
        """Everything before the first iteration (idempotent)."""
        if self._is_set_up:
            return
        recipe, host = self.recipe, self.host
        self.dist_env = env = distributed.read_distributed_env(self.environ)
        self._select_device()
        backend = resolve_distributed_backend(recipe.accelerator.distributed_backend, self.device.kind)
        self._owns_process_group = distributed.init_process_group(env, backend)
        resume_from = find_resume_checkpoint(recipe.runtime.resume, self.checkpoint_dir, env)
        self._seed(recipe.runtime.seed)
        load_from = recipe.runtime.load_from if resume_from is None else None
        self.model, self.precision = build_device_model(recipe, host, self.selection, load_from=load_from)
        self.wrapped: nn.Module = self.model
        if env.is_distributed:
            self.wrapped = DistributedDataParallel(
                self.model,
                device_ids=None if self.device.kind == "cpu" else [self.device.index],
                find_unused_parameters=False,
                **_no_buffer_broadcast(),
                **self.selection.context.ddp_options,
            )
        self.optimizer = build_run_optimizer(self.model, recipe, host, self.selection)
        self.step = TrainStep(model=self.wrapped, optimizer=self.optimizer, precision=self.precision,
                              grad_clip=recipe.optimization.grad_clip, world_size=env.world_size)
        self.train_dataset = build_dataset(recipe, host.registries, training=True)
        plan = iteration_plan(recipe, num_samples=len(self.train_dataset), world_size=env.world_size)
        self.iters_per_epoch, self.max_iters = plan.iters_per_epoch, plan.max_iters
        self.checkpoint_interval = plan.checkpoint_interval
        schedule = recipe.optimization.lr_scheduler
        self.lr_schedule = host.registries.lr_schedulers.build(
            schedule.type, schedule.arguments, max_iters=self.max_iters
        )
        self.train_loader = self._make_loader(
            self.train_dataset, recipe.data.batch_size_per_device, training=True
        )
        self.state = TrainingState(self.model, self.optimizer, self.precision.scaler,
                                   _sampler_of(self.train_loader), self.device, env)
        if resume_from is not None:
            self._resume_rng = self.state.load(*resume_from)
            self._last_checkpoint = resume_from[1]
            if env.is_main:
                logger.info("resumed from %s at iteration %d", resume_from[1], self.iteration)
        self._announce(backend)
        if resume_from is None and recipe.optimization.geometric_warm_start.steps > 0:
            run_geometric_warm_start(
                self.model, self.train_dataset, recipe=recipe, device=self.device.torch_device, dist_env=env,
                collate=getattr(self.train_loader, "collate_fn", None) or collate_frames,
            )
        self.context = TrainingContext(
            recipe=recipe, model=self.model, optimizer=self.optimizer, device=self.device, dist_env=env,
            work_dir=self.work_dir, iters_per_epoch=self.iters_per_epoch, max_iters=self.max_iters,
            iteration=self.iteration, adapters=list(self.adapters.records),
        )
        self._is_set_up = True

    def _select_device(self) -> None:
        self.selection = select_device(self.recipe, self.host, dist_env=self.dist_env, environ=self.environ)
        self.device, self.device_choice = self.selection.device, self.selection.how
        self.adapters = self.selection.adapters

    def _seed(self, seed: int) -> None:
        # Same seed on every rank, as the reference (mmdet3d's train.py without --diff-seed).
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        module = self.device.module
        if module is not None:
            module.manual_seed_all(seed)

    def _make_loader(self, dataset: Any, batch_size: int, *, training: bool) -> Any:
        return self._loader_factory(
            dataset, batch_size=batch_size, num_workers=self.recipe.data.num_workers, rank=self.dist_env.rank,
            world_size=self.dist_env.world_size, seed=self.recipe.runtime.seed, training=training,
        )

    def _announce(self, backend: str) -> None:
        env = self.dist_env
        self.log = RunLog(self.recipe, self.work_dir, device=self.device, world_size=env.world_size,
                          is_main=env.is_main)
        self.log.open()
        processes = f"{env.world_size} processes, {backend}" if env.is_distributed else "1 process"
        title = f"device {self.device.describe()} [{self.device_choice}], {processes}; adapters:"
        self.log.info("%s", self.adapters.summary_table(title))
        self.log.info(
            "training %s from iteration %d to %d (%d per epoch; batch %d per process, %d process(es)), "
            "checkpoint every %d, precision %s, work dir %s",
            self.recipe.name, self.iteration, self.max_iters, self.iters_per_epoch,
            self.recipe.data.batch_size_per_device, env.world_size, self.checkpoint_interval,
            self.precision.describe(), self.work_dir,
        )

    def _base_lr(self) -> float:
        """The lr of the parameters without a multiplier (the heads; the backbone's is x0.1)."""
        groups = self.optimizer.param_groups
        plain = [group for group in groups if group.get("lr_mult", 1.0) == 1.0]
        return (plain or groups)[0]["lr"]

    def train_step(self, batch: Mapping[str, Any]) -> Dict[str, float]:
        """One iteration on a batch already on the device; returns the rank-mean loss terms and
        ``loss`` (their total), ``grad_norm`` and ``skipped`` (1.0 when no step was taken)."""
        result = self._step(batch)
        return {**result.terms, "grad_norm": result.grad_norm, "skipped": float(result.skipped)}

    def _step(self, batch: Mapping[str, Any]) -> StepResult:
        factor = self.lr_schedule(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        result = self.step(batch)
        self._nonfinite_streak = self._nonfinite_streak + 1 if result.skipped else 0
        return result

    def _check_nonfinite(self, terms: Mapping[str, float], grad_norm: float) -> None:
        limit = self.recipe.runtime.max_nonfinite_steps
        if self._nonfinite_streak == 0:
            return
        logger.warning(
            "iteration %d: non-finite loss or gradient (loss %s, grad_norm %s), step skipped "
            "(%d in a row, limit %d)",
            self.iteration, terms["loss"], grad_norm, self._nonfinite_streak, limit,
        )
        if self._nonfinite_streak >= limit:
            bad = sorted(name for name, value in {**terms, "grad_norm": grad_norm}.items()
                         if not math.isfinite(value))
            weights = nonfinite_entries(dict(self.model.named_parameters()))
            raise NonFiniteLossError(describe(
                f"iteration {self.iteration}",
                f"the loss or the gradients were not finite in {self._nonfinite_streak} consecutive "
                f"iterations (runtime.max_nonfinite_steps={limit}; non-finite: {', '.join(bad)}"
                + (f"; {len(weights)} weight tensors are not finite, e.g. {weights[0]}" if weights else "")
                + f"); last good checkpoint: {self._last_checkpoint or 'none'}",
                "check the data (degenerate boxes, NaN inputs), lower the learning rate, or train "
                "without fp16 (optimization.amp.enabled=false); runtime.resume=auto continues from the "
                "last good checkpoint",
            ))

    def train(self) -> TrainResult:
        """Run to ``max_iters`` (evaluating and checkpointing on the way); then evaluate if configured."""
        self.setup()
        hooks = self.host.hooks
        self.model.train()
        hooks.pre_train(context=self.context)
        try:
            iterator = iter(self.train_loader)
            if self._resume_rng is not None:
                # Only now: creating the loader's iterator draws a random seed, in both runs alike.
                restore_rng_state(self._resume_rng, self.device)
                self._resume_rng = None
            self._run_iterations(endless_batches(
                self.train_loader, iterator=iterator, first_epoch=self.iteration // self.iters_per_epoch,
                epoch_sampler=self.state.sampler,
            ))
            if self.recipe.runtime.evaluate_at_end:
                self.context.eval_metrics = self.evaluate()
        except BaseException as error:
            self.context.stop_reason = f"{type(error).__name__}: {error}"
            raise
        finally:
            self.context.iteration = self.iteration
            hooks.post_train(context=self.context)
            self.log.close()
        metrics_file = self.log.metrics.path if self.log.metrics is not None else None
        return TrainResult(self.iteration, self.context.eval_metrics, self._last_checkpoint, self.work_dir,
                           metrics_file, self._last_evaluation)

    def _progress_bar(self) -> Optional[ProgressBar]:
        setting = self.recipe.runtime.progress_bar
        if not self.dist_env.is_main or setting == "off" or (setting == "auto" and not sys.stderr.isatty()):
            return None
        return ProgressBar(total=self.max_iters, initial=self.iteration)

    def _run_iterations(self, batches: Iterator[Any]) -> None:
        runtime = self.recipe.runtime
        bar = self._progress_bar()
        interval = Interval()
        device = self.device.torch_device
        tick = time.perf_counter()
        while self.iteration < self.max_iters:
            batch = next(batches)
            data_time = time.perf_counter() - tick
            result = self._step(move_to_device(batch, device))
            self.iteration += 1
            self.context.iteration = self.iteration
            step_time = time.perf_counter() - tick
            tick = time.perf_counter()
            interval.add(result, step_time, data_time)
            self._check_nonfinite(result.terms, result.grad_norm)
            if self.iteration % runtime.log_interval == 0 or self.iteration == self.max_iters:
                self.log.interval(interval, iteration=self.iteration, max_iters=self.max_iters,
                                  iters_per_epoch=self.iters_per_epoch, lr=self._base_lr(),
                                  loss_scale=self.precision.loss_scale())
                interval = Interval()
            if bar is not None:
                bar.update(self.iteration, f"loss {result.terms['loss']:.4f}")
            if self.iteration % self.checkpoint_interval == 0 or self.iteration == self.max_iters:
                self.save_checkpoint()
            evaluation_due = runtime.eval_interval and self.iteration % runtime.eval_interval == 0
            if evaluation_due and self.iteration < self.max_iters:
                self.evaluate()
            tick = time.perf_counter()
        if bar is not None:
            bar.close()

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current iteration (collective: call it on every rank)."""
        run_facts = {"recipe": recipe_to_dict(self.recipe), "plugin_versions": self.host.versions(),
                     "scheduler_type": self.recipe.optimization.lr_scheduler.type}
        self._last_checkpoint = self.state.save(self.checkpoint_dir, run_facts=run_facts,
                                                keep_last=self.recipe.runtime.keep_last,
                                                last_good=self._last_checkpoint)
        return self._last_checkpoint

    def evaluate(self) -> Dict[str, Any]:
        """Run the val set (each rank its slice), gather predictions, score them on rank 0.

        Collective: call it on every rank. Returns the metrics on rank 0, an empty dict elsewhere.
        """
        data = self.recipe.data
        distributed.broadcast_buffers(self.model)  # every rank scores with the statistics checkpoints hold
        if self._val_loader is None:
            self._val_dataset = build_dataset(self.recipe, self.host.registries, training=False)
            self._val_loader = self._make_loader(self._val_dataset, data.val_batch_size_per_device,
                                                 training=False)
        started = time.perf_counter()
        predictions = collect_predictions(
            self.model, self._val_loader, device=self.device.torch_device, autocast=self.precision.autocast()
        )
        gathered = distributed.all_gather_objects(predictions)
        metrics: Dict[str, Any] = {}
        if self.dist_env.is_main:
            merged = merge_predictions(gathered)
            output_dir = self.work_dir / "eval" / f"iter_{self.iteration:08d}"
            output_dir.mkdir(parents=True, exist_ok=True)
            metrics = dict(self._evaluator(merged, self._val_dataset, output_dir))
            if self.recipe.tracking.evaluate:
                metrics.update(tracking_evaluator(
                    self.recipe, self.host.registries, merged, self._val_dataset, output_dir,
                    restarts=stream_starts(gathered),
                ))
            self._last_evaluation = save_evaluation_outputs(
                merged, self._val_dataset, output_dir, class_names=data.class_names
            )
            logger.info(
                "evaluation at iteration %d: %d samples in %.1f s: %s",
                self.iteration, len(merged), time.perf_counter() - started,
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
            )
            self.log.evaluation(self.iteration, metrics)
        distributed.barrier()
        return metrics

    def close(self) -> None:
        """Leave the process group if this trainer created it."""
        if self._owns_process_group:
            distributed.destroy_process_group()
            self._owns_process_group = False


def train(
    recipe: Recipe,
    *,
    host: PluginHost,
    environ: Optional[MutableMapping[str, str]] = None,
    loader_factory: Optional[LoaderFactory] = None,
    evaluator: Optional[Evaluator] = None,
) -> TrainResult:
    """Set up, train and evaluate ``recipe`` (in this process; under torchrun, in every process)."""
    trainer = Trainer(recipe, host=host, environ=environ, loader_factory=loader_factory, evaluator=evaluator)
    try:
        return trainer.train()
    finally:
        trainer.close()
