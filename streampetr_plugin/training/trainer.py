"""The training loop: one recipe, one process or many (torchrun), NPU, CUDA or CPU.

Set-up (:meth:`Trainer.setup`) puts together what the training modules provide: the process layout from
torchrun's environment, the device and its adapters (:mod:`~streampetr_plugin.training.startup`), the
process group (HCCL / NCCL / gloo), the checkpoint to resume from (``runtime.resume``,
:mod:`~streampetr_plugin.training.checkpointing`), seeds, the model (with the ``load_from`` weights unless
resuming) and its DDP wrapper, the optimiser, the data, the iteration plan and lr schedule, the resumed
:class:`~streampetr_plugin.training.checkpointing.TrainingState`, the run's log
(:mod:`~streampetr_plugin.training.run_log`), and when starting afresh the geometric warm start if the
recipe asks for it. :meth:`Trainer.train` then calls ``streampetr_pre_train``, iterates, evaluates
(:class:`~streampetr_plugin.training.evaluation.RunEvaluation`) and checkpoints on the way, and calls
``streampetr_post_train`` (also after an error).

One iteration is :class:`~streampetr_plugin.training.step.TrainStep` after the lr of every group is set
for it (the schedule is per iteration), then, with ``optimization.ema`` on, an update of the moving
average of the weights (:mod:`~streampetr_plugin.training.ema`), which evaluations use and checkpoints
save as the run's weights. A non-finite loss or gradient skips the step;
``runtime.max_nonfinite_steps`` skipped steps in a row stop the run
(:class:`~streampetr_plugin.training.nonfinite.NonFiniteStreak`), and so does a checkpoint due while the
weights, buffers or optimiser state hold a NaN or an infinity: such a checkpoint is never written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, MutableMapping, Optional

import torch
from torch import nn

from streampetr_plugin.adapters.base import AdapterRecord
from streampetr_plugin.adapters.device import DeviceHandle, resolve_distributed_backend
from streampetr_plugin.config.loader import recipe_to_dict
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.data.build import build_dataset
from streampetr_plugin.data.collate import collate_frames
from streampetr_plugin.data.loader import build_dataloader, endless_batches
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.training import distributed
from streampetr_plugin.training.batches import move_to_device
from streampetr_plugin.training.checkpointing import (
    CHECKPOINT_DIR,
    TrainingState,
    data_position_of,
    find_resume_checkpoint,
    restore_rng_state,
)
from streampetr_plugin.training.distributed import DistributedEnv
from streampetr_plugin.training.ema import WeightEMA
from streampetr_plugin.training.evaluation import (
    EvaluationOutputs,
    Evaluator,
    RunEvaluation,
    default_evaluator,
)
from streampetr_plugin.training.geometric_warm_start import run_geometric_warm_start
from streampetr_plugin.training.nonfinite import NonFiniteStreak
from streampetr_plugin.training.run_log import Interval, RunLog, base_lr
from streampetr_plugin.training.startup import (
    build_device_model,
    build_run_optimizer,
    iteration_plan,
    seed_everything,
    select_device,
    wrap_for_ranks,
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
        self._resume_rng: Optional[Dict[str, Any]] = None
        self._owns_process_group = False
        self._last_checkpoint: Optional[Path] = None
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
        seed_everything(recipe.runtime.seed, self.device)
        load_from = recipe.runtime.load_from if resume_from is None else None
        self.model, self.precision = build_device_model(recipe, host, self.selection, load_from=load_from)
        self.optimizer = build_run_optimizer(self.model, recipe, host, self.selection)
        self.step = TrainStep(model=wrap_for_ranks(self.model, self.selection, env), optimizer=self.optimizer,
                              precision=self.precision, grad_clip=recipe.optimization.grad_clip,
                              world_size=env.world_size)
        self.nonfinite = NonFiniteStreak(recipe.runtime.max_nonfinite_steps)
        self.train_dataset = build_dataset(recipe, host.registries, training=True)
        plan = iteration_plan(recipe, num_samples=len(self.train_dataset), world_size=env.world_size)
        self.iters_per_epoch, self.max_iters = plan.iters_per_epoch, plan.max_iters
        self.checkpoint_interval = plan.checkpoint_interval
        schedule = recipe.optimization.lr_scheduler
        self.lr_schedule = host.registries.lr_schedulers.build(
            schedule.type, schedule.arguments, max_iters=self.max_iters
        )
        self.train_loader = self._make_loader(self.train_dataset, recipe.data.batch_size_per_device,
                                              training=True)
        self.evaluation = RunEvaluation(recipe, host.registries, make_loader=self._make_loader,
                                        evaluator=self._evaluator, dist_env=env, work_dir=self.work_dir)
        ema = recipe.optimization.ema
        self.ema = WeightEMA(decay=ema.decay) if ema.enabled else None
        self.state = TrainingState(self.model, self.optimizer, self.precision.scaler,
                                   data_position_of(self.train_loader), self.device, env, ema=self.ema)
        if resume_from is not None:
            self._resume_rng = self.state.load(*resume_from)
            self._last_checkpoint = resume_from[1]
            if env.is_main:
                logger.info("resumed from %s at iteration %d", resume_from[1], self.iteration)
        self.log = RunLog(recipe, self.work_dir, device=self.device, world_size=env.world_size,
                          is_main=env.is_main)
        self.log.open()
        processes = f"{env.world_size} processes, {backend}" if env.is_distributed else "1 process"
        self.log.announce(
            adapters_table=self.adapters.summary_table(
                f"device {self.device.describe()} [{self.device_choice}], {processes}; adapters:"
            ),
            iteration=self.iteration, max_iters=self.max_iters, iters_per_epoch=self.iters_per_epoch,
            checkpoint_interval=self.checkpoint_interval, precision=self.precision.describe(),
        )
        if resume_from is None and recipe.optimization.geometric_warm_start.steps > 0:
            run_geometric_warm_start(
                self.model, self.train_dataset, recipe=recipe, device=self.device.torch_device, dist_env=env,
                collate=getattr(self.train_loader, "frame_collate", collate_frames),
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

    def _make_loader(self, dataset: Any, batch_size: int, *, training: bool) -> Any:
        return self._loader_factory(
            dataset, batch_size=batch_size, num_workers=self.recipe.data.num_workers, rank=self.dist_env.rank,
            world_size=self.dist_env.world_size, seed=self.recipe.runtime.seed, training=training,
        )

    def train_step(self, batch: Mapping[str, Any]) -> Dict[str, float]:
        """One iteration on a batch already on the device; returns the rank-mean loss terms and
        ``loss`` (their total), ``grad_norm`` and ``skipped`` (1.0 when no step was taken)."""
        result = self._step(batch)
        return {**result.terms, "grad_norm": result.grad_norm, "skipped": float(result.skipped)}

    def _step(self, batch: Mapping[str, Any]) -> StepResult:
        factor = self.lr_schedule(self.iteration)  # the schedule is per iteration
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.step(batch)

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
                           metrics_file, self.evaluation.last_outputs)

    def _run_iterations(self, batches: Iterator[Any]) -> None:
        runtime = self.recipe.runtime
        bar = self.log.progress_bar(total=self.max_iters, initial=self.iteration)
        interval = Interval()
        device = self.device.torch_device
        tick = time.perf_counter()
        while self.iteration < self.max_iters:
            batch = next(batches)
            data_time = time.perf_counter() - tick
            result = self._step(move_to_device(batch, device))
            if self.ema is not None and not result.skipped:
                self.ema.update(self.model)
            self.iteration += 1
            self.context.iteration = self.iteration
            step_time = time.perf_counter() - tick
            tick = time.perf_counter()
            interval.add(result, step_time, data_time)
            self.nonfinite.update(result, iteration=self.iteration, model=self.model,
                                  last_checkpoint=self._last_checkpoint)
            if self.iteration % runtime.log_interval == 0 or self.iteration == self.max_iters:
                self.log.interval(interval, iteration=self.iteration, max_iters=self.max_iters,
                                  iters_per_epoch=self.iters_per_epoch, lr=base_lr(self.optimizer),
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
        """Score the val set at this iteration (collective: call it on every rank), with the moving average
        of the weights when the recipe keeps one; the metrics on rank 0, an empty dict elsewhere."""
        averaged = self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()
        with averaged:
            metrics = self.evaluation(self.model, iteration=self.iteration, device=self.device.torch_device,
                                      autocast=self.precision.autocast())
        self.log.evaluation(self.iteration, metrics)
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
