"""The training loop: one recipe, one process or many (torchrun), NPU, CUDA or CPU.

Start-up order (each step needs the one before):

1. the process layout from torchrun's environment (:mod:`streampetr_plugin.training.distributed`);
2. the device: a candidate from the recipe and what is installed, the ENVIRONMENT adapters (variables
   that must exist before the device runtime loads), then the device confirmed, the RUNTIME adapters,
   the process's device made current (a clear error when ``LOCAL_RANK`` exceeds the visible devices)
   and the process group (HCCL / NCCL / gloo);
3. the checkpoint to resume from (``runtime.resume``), if any, then seeds, the model (on the CPU, with
   the ``load_from`` weights unless resuming), moved to the device, the MODEL adapters, the DDP
   wrapper (``find_unused_parameters=False``, no buffer broadcast before each forward, plus adapter
   options; rank 0's buffers are broadcast before every evaluation and checkpoint instead);
4. the OPTIMIZER adapters, then the optimiser (per-module lr multipliers) once the model is moved and
   wrapped, the loss scaler, the data, the iteration plan and lr schedule, the training loader;
5. the resumed state loaded; the start-up log (the recipe in ``recipe.yaml``, the adapter table, the
   iteration plan); when starting afresh, the geometric warm start if the recipe asks for it
   (``optimization.geometric_warm_start``); at :meth:`Trainer.train` the ``streampetr_pre_train`` hook.

One iteration, as the reference's ``Fp16OptimizerHook``: set the lr of every group for this iteration
(the schedule is per iteration), zero grads, forward under autocast, total = the plain sum of every
entry whose name contains ``"loss"``, (scaled) backward, unscale, clip the gradient norm, step unless
the loss or the gradients are not finite, update the loss scale. The logged loss terms are the means
over ranks (one small all-reduce per iteration, which also makes every rank take the same skip
decision). A non-finite loss or gradient skips the step; ``runtime.max_nonfinite_steps`` skipped steps
in a row stop the run with :class:`NonFiniteLossError`, and so does a checkpoint due while the weights,
buffers or optimiser state hold a NaN or an infinity: such a checkpoint is never written.

Checkpoints (:mod:`streampetr_plugin.training.checkpointing`): ``runtime.resume=none`` refuses a work
dir that already holds checkpoints; ``auto`` takes the newest one that loads and verifies; pruning
only removes checkpoints older than the one just written; a checkpoint that does not fit this run
(another recipe) is a one-line error.
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

from streampetr_plugin.adapters.base import AdapterContext, AdapterRecord, AdapterRunner, Phase
from streampetr_plugin.adapters.device import (
    DeviceHandle,
    candidate_device,
    confirm_device,
    device_for_local_rank,
    resolve_distributed_backend,
)
from streampetr_plugin.config.loader import dump_recipe, recipe_to_dict
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.data.build import build_dataset
from streampetr_plugin.data.collate import collate_frames
from streampetr_plugin.data.loader import endless_batches
from streampetr_plugin.errors import InputError, RunError, describe
from streampetr_plugin.models.build import build_model
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.training import distributed
from streampetr_plugin.training.batches import move_to_device, total_loss
from streampetr_plugin.training.checkpointing import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CheckpointWriteError,
    capture_rng_state,
    check_model_fits,
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_stream_states,
    nonfinite_entries,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng_state,
    resume_mismatch,
    stream_states,
    to_cpu,
    write_checkpoint,
    write_failure,
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
from streampetr_plugin.training.metrics_log import IterationPace, MetricsLog, ProgressBar, format_duration
from streampetr_plugin.training.optimizers import build_optimizer
from streampetr_plugin.training.precision import MixedPrecision

logger = logging.getLogger(__name__)

LoaderFactory = Callable[..., Any]
# The "rank" part of the augmentation draw keys of the warm start's frames: no real rank is this large,
# so they never repeat a training draw.
WARM_START_DRAW_KEY = 2**31 - 1


class NonFiniteLossError(RunError):
    """Training went non-finite: too many steps in a row skipped for a non-finite loss or gradient, or a
    checkpoint due while the weights or optimiser state hold a NaN or an infinity."""


class WorkDirNotEmptyError(InputError):
    """``runtime.resume=none`` in a work dir that already holds checkpoints."""


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


@dataclass
class _Interval:
    """Running sums between two log lines."""

    steps: int = 0
    skipped: int = 0
    terms: Dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    finite_norms: int = 0
    step_time: float = 0.0
    data_time: float = 0.0


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


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _default_loader_factory() -> LoaderFactory:
    from streampetr_plugin.data.loader import build_dataloader

    return build_dataloader


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
        self._loader_factory = loader_factory
        self._evaluator = evaluator
        self.work_dir = Path(recipe.work_dir())
        self.checkpoint_dir = self.work_dir / CHECKPOINT_DIR
        self.iteration = 0
        self._nonfinite_streak = 0
        self._val_loader: Any = None
        self._val_dataset: Any = None
        self._metrics_log: Optional[MetricsLog] = None
        self._resume_rng: Optional[Dict[str, Any]] = None
        self._resume_from: Optional[tuple] = None
        self._owns_process_group = False
        self._last_checkpoint: Optional[Path] = None
        self._last_evaluation: Optional[EvaluationOutputs] = None
        self._is_set_up = False

    # ----------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Everything before the first iteration (idempotent)."""
        if self._is_set_up:
            return
        recipe = self.recipe
        self.dist_env = distributed.read_distributed_env(self.environ)
        self._select_device()
        backend = resolve_distributed_backend(recipe.accelerator.distributed_backend, self.device.kind)
        self._owns_process_group = distributed.init_process_group(self.dist_env, backend)
        self._resume_from = self._find_resume_checkpoint()
        self._seed(recipe.runtime.seed)
        self._build_model()
        self._build_optimizer()
        self._build_data()
        fresh_start = self._resume_from is None
        if self._resume_from is not None:
            self._load_state(*self._resume_from)
            self._resume_from = None  # the loaded state is not needed any more
        self._announce()
        if fresh_start and recipe.optimization.geometric_warm_start.steps > 0:
            self._geometric_warm_start()
        self.context = TrainingContext(
            recipe=recipe,
            model=self.model,
            optimizer=self.optimizer,
            device=self.device,
            dist_env=self.dist_env,
            work_dir=self.work_dir,
            iters_per_epoch=self.iters_per_epoch,
            max_iters=self.max_iters,
            iteration=self.iteration,
            adapters=list(self.adapters.records),
        )
        self._is_set_up = True

    def _select_device(self) -> None:
        env = self.dist_env
        candidate, how = candidate_device(
            self.recipe.accelerator.device, hooks=self.host.hooks, environ=self.environ
        )
        self.adapters, self.adapter_context = self._adapters_for(candidate)
        self.adapters.run(Phase.ENVIRONMENT, self.adapter_context)
        kind, self.device_choice = confirm_device(candidate, how)
        if kind != candidate:
            self.adapters, self.adapter_context = self._adapters_for(kind)
            self.adapters.run(Phase.ENVIRONMENT, self.adapter_context)
        self.adapters.run(Phase.RUNTIME, self.adapter_context)
        self.device = device_for_local_rank(kind, env.local_rank)
        self.device.activate()

    def _adapters_for(self, kind: str) -> tuple:
        env = self.dist_env
        context = AdapterContext(
            device=kind,
            environ=self.environ,
            rank=env.rank,
            local_rank=env.local_rank,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            recipe=self.recipe,
            registries=self.host.registries,
        )
        return AdapterRunner.from_recipe(self.recipe, kind, self.host.registries), context

    def _seed(self, seed: int) -> None:
        # Same seed on every rank, as the reference (mmdet3d's train.py without --diff-seed).
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        module = self.device.module
        if module is not None:
            module.manual_seed_all(seed)

    def _build_model(self) -> None:
        recipe = self.recipe
        model = build_model(recipe, self.host.registries)
        self.host.hooks.post_model_build(model=model, recipe=recipe)
        load_from = recipe.runtime.load_from
        if load_from and self._resume_from is None:
            from streampetr_plugin.interop.checkpoint import load_reference_checkpoint

            if not Path(load_from).is_file():
                raise InputError(describe(
                    "runtime.load_from", f"{load_from} does not exist",
                    "reference weights: see docs/reproducing.md; runtime.load_from=null trains from the "
                    "initialisation",
                ))

            report = load_reference_checkpoint(model, load_from)
            if self.dist_env.is_main:
                logger.info("load_from: %s", report.summary())
        model.to(self.device.torch_device)
        self.model = model
        self.adapter_context.model = model
        self.adapters.run(Phase.MODEL, self.adapter_context)
        self.precision = MixedPrecision(recipe.optimization.amp, self.device)
        self.precision.configure_model(model)
        self.wrapped: nn.Module = model
        if self.dist_env.is_distributed:
            device_ids = None if self.device.kind == "cpu" else [self.device.index]
            self.wrapped = DistributedDataParallel(
                model,
                device_ids=device_ids,
                find_unused_parameters=False,
                **_no_buffer_broadcast(),
                **self.adapter_context.ddp_options,
            )

    def _build_optimizer(self) -> None:
        self.adapters.run(Phase.OPTIMIZER, self.adapter_context)
        self.optimizer = build_optimizer(self.model, self.recipe, self.adapter_context, self.host.registries)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def _build_data(self) -> None:
        recipe = self.recipe
        env = self.dist_env
        registries = self.host.registries
        data = recipe.data
        self.train_dataset = build_dataset(recipe, registries, training=True)
        batch = data.batch_size_per_device
        num_samples = data.num_train_samples or len(self.train_dataset)
        runtime = recipe.runtime
        self.iters_per_epoch = runtime.iters_per_epoch or max(1, num_samples // (env.world_size * batch))
        self.max_iters = runtime.max_iters or runtime.epochs * self.iters_per_epoch
        self.checkpoint_interval = runtime.checkpoint_interval or self.iters_per_epoch
        schedule_spec = recipe.optimization.lr_scheduler
        self.lr_schedule = registries.lr_schedulers.build(
            schedule_spec.type, schedule_spec.arguments, max_iters=self.max_iters
        )
        self.train_loader = self._make_loader(self.train_dataset, batch, training=True)
        self.train_sampler = _sampler_of(self.train_loader)

    def _geometric_warm_start(self) -> None:
        """Align the head's position embeddings with the cameras before iteration 0 (no labels), on
        frames spread over the training set, the same on every rank; rank 0's result is broadcast."""
        from streampetr_plugin.models.heads.geometric_warm_start import (
            geometric_warm_start,
            warm_start_parameters,
        )

        options = self.recipe.optimization.geometric_warm_start
        dataset = self.train_dataset
        indices = np.linspace(0, len(dataset) - 1, num=min(options.frames, len(dataset))).round().astype(int)
        keyed = getattr(dataset, "accepts_draw_keys", False)
        frames = [dataset[(int(index), (WARM_START_DRAW_KEY, slot))] if keyed else dataset[int(index)]
                  for slot, index in enumerate(indices)]
        collate = getattr(self.train_loader, "collate_fn", None) or collate_frames
        size = self.recipe.data.batch_size_per_device
        batches = [move_to_device(collate(frames[i:i + size]), self.device.torch_device)
                   for i in range(0, len(frames), size)]
        started = time.perf_counter()
        use_grid_mask = getattr(self.model, "use_grid_mask", False)
        self.model.use_grid_mask = False  # the features of the clean images
        try:
            result = geometric_warm_start(
                self.model, batches, steps=options.steps, lr=options.lr, num_points=options.points,
                generator=torch.Generator().manual_seed(self.recipe.runtime.seed),
            )
        finally:
            self.model.use_grid_mask = use_grid_mask
        if self.dist_env.is_distributed:
            for param in warm_start_parameters(self.model.pts_bbox_head):
                torch.distributed.broadcast(param.data, src=0)
        if self.dist_env.is_main:
            logger.info(
                "geometric warm start: %d steps on %d frames in %.1f s; cross-entropy %.3f -> %.3f, "
                "attention on the projected tokens %.3f -> %.3f",
                result.steps, len(frames), time.perf_counter() - started, result.first_loss,
                result.last_loss, result.first_target_attention, result.last_target_attention,
            )

    def _make_loader(self, dataset: Any, batch_size: int, *, training: bool) -> Any:
        factory = self._loader_factory or _default_loader_factory()
        return factory(
            dataset,
            batch_size=batch_size,
            num_workers=self.recipe.data.num_workers,
            rank=self.dist_env.rank,
            world_size=self.dist_env.world_size,
            seed=self.recipe.runtime.seed,
            training=training,
        )

    # ---------------------------------------------------------------------------------- checkpoints

    def _resume_source(self) -> Optional[str]:
        resume = self.recipe.runtime.resume
        return None if resume in ("none", "", None) else resume

    def _find_resume_checkpoint(self) -> Optional[tuple]:
        """``(state, path)`` to continue from, per ``runtime.resume``; every rank reads the file rank 0 chose
        (multi-node resume needs the work dir on a shared filesystem)."""
        source = self._resume_source()
        is_main = self.dist_env.is_main
        if source is None:
            # Starting afresh beside older checkpoints would mix two runs in one directory.
            existing = [path.name for _, path in list_checkpoints(self.checkpoint_dir)] if is_main else None
            existing = distributed.all_gather_objects(existing)[0]
            if existing:
                raise WorkDirNotEmptyError(describe(
                    str(self.checkpoint_dir),
                    f"holds {len(existing)} checkpoint(s) ({existing[0]} .. {existing[-1]}) and "
                    "runtime.resume=none would start a new run among them",
                    "runtime.resume=auto continues from the newest; to start afresh, set a new "
                    "runtime.work_dir or move the checkpoints away",
                ))
            return None
        if source != "auto":
            return load_checkpoint(Path(source)), Path(source)
        if is_main:
            removed = remove_stale_temporaries(self.checkpoint_dir)
            if removed:
                logger.info("removed %d partial checkpoint file(s) left by an interrupted save", len(removed))
        found = find_latest_checkpoint(self.checkpoint_dir) if is_main else None
        chosen = distributed.all_gather_objects(None if found is None else str(found[0]))[0]
        if chosen is None:
            skipped = [path.name for _, path in list_checkpoints(self.checkpoint_dir)] if is_main else []
            if skipped:
                logger.warning(
                    "NO USABLE CHECKPOINT in %s: skipped %s (see the warnings above); training starts from "
                    "iteration 0 and leaves those files in place", self.checkpoint_dir, ", ".join(skipped),
                )
            return None
        if found is not None:
            return found[1], found[0]
        return load_checkpoint(Path(chosen)), Path(chosen)

    def _load_state(self, state: Dict[str, Any], path: Path) -> None:
        check_model_fits(path, state["state_dict"], self.model)
        self.model.load_state_dict(state["state_dict"])
        current = _qualified_name(type(self.optimizer))
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
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        if state.get("world_size") == self.dist_env.world_size:
            rank = self.dist_env.rank
            if self.train_sampler is not None and state["sampler"][rank] is not None:
                try:
                    self.train_sampler.load_state_dict(state["sampler"][rank])
                except (ValueError, KeyError, TypeError) as error:
                    detail = str(error).split("\n")[0]
                    raise resume_mismatch(path, "the data sampler state", detail) from error
            load_stream_states(self.model, state["streams"][rank], self.device.torch_device)
            self._resume_rng = state["rng"][rank]
        elif self.dist_env.is_main:
            logger.warning(
                "%s was written by %s processes, this run has %d: data order, streams and RNG start afresh",
                path, state.get("world_size"), self.dist_env.world_size,
            )
        self._last_checkpoint = path
        if self.dist_env.is_main:
            logger.info("resumed from %s at iteration %d", path, self.iteration)

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current iteration (collective: call it on every rank).

        Every rank first takes rank 0's buffers, so the file holds what each rank continues with.
        Raises :class:`NonFiniteLossError` instead of writing non-finite weights, buffers or optimiser
        state, and :class:`CheckpointWriteError` on every rank when rank 0 cannot write the file.
        """
        distributed.broadcast_buffers(self.model)
        self._refuse_nonfinite_state()
        sampler_state = self.train_sampler.state_dict() if self.train_sampler is not None else None
        per_rank = distributed.all_gather_objects(
            {
                "sampler": sampler_state,
                "streams": stream_states(self.model),
                "rng": capture_rng_state(self.device),
            }
        )
        path = checkpoint_path(self.checkpoint_dir, self.iteration)
        failure: Optional[CheckpointWriteError] = None
        if self.dist_env.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "state_dict": to_cpu(self.model.state_dict()),
                "optimizer": to_cpu(self.optimizer.state_dict()),
                "optimizer_class": _qualified_name(type(self.optimizer)),
                "scheduler": {
                    "type": self.recipe.optimization.lr_scheduler.type,
                    "iteration": self.iteration,
                },
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
                "iteration": self.iteration,
                "world_size": self.dist_env.world_size,
                "sampler": [item["sampler"] for item in per_rank],
                "streams": [item["streams"] for item in per_rank],
                "rng": [item["rng"] for item in per_rank],
                "recipe": recipe_to_dict(self.recipe),
                "plugin_versions": self.host.versions(),
            }
            try:
                write_checkpoint(state, path)
            except CheckpointWriteError as error:
                failure = error
            else:
                prune_checkpoints(self.checkpoint_dir, self.recipe.runtime.keep_last, self.iteration)
                logger.info("saved %s", path)
        # Rank 0's outcome, on every rank: a failed write stops them all instead of leaving them waiting.
        outcome = distributed.all_gather_objects(None if failure is None else str(failure))[0]
        if outcome is not None:
            raise failure or CheckpointWriteError(outcome)
        self._last_checkpoint = path
        return path

    def _refuse_nonfinite_state(self) -> None:
        """:class:`NonFiniteLossError` when the weights, buffers or optimiser state hold a NaN or an
        infinity (e.g. a damaged optimiser moment turned finite-loss steps into NaN weights); the
        decision is summed over ranks so that all of them stop together."""
        bad = nonfinite_entries(
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()["state"]}
        )
        count = torch.tensor([float(len(bad))], device=self.device.torch_device)
        if distributed.all_reduce_sum(count).item() == 0:
            return
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteLossError(describe(
            f"iteration {self.iteration}",
            f"not saving a checkpoint: the training state is not finite ({shown or 'on another rank'}); "
            f"last good checkpoint: {self._last_checkpoint or 'none'}",
            "resume from the last good checkpoint with a lower learning rate, or check the data and the "
            "checkpoint it was resumed from",
        ))

    # --------------------------------------------------------------------------------------- logging

    def _announce(self) -> None:
        env = self.dist_env
        if not env.is_main:
            return
        runtime = self.recipe.runtime
        tensorboard_dir = self.work_dir / "tensorboard" if runtime.tensorboard else None
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / "recipe.yaml").write_text(dump_recipe(self.recipe), encoding="utf-8")
            self._metrics_log = MetricsLog(self.work_dir / "metrics.jsonl", tensorboard_dir=tensorboard_dir)
        except OSError as error:
            raise write_failure(Path(error.filename or self.work_dir), error) from error
        backend = resolve_distributed_backend(self.recipe.accelerator.distributed_backend, self.device.kind)
        processes = f"{env.world_size} processes, {backend}" if env.is_distributed else "1 process"
        title = f"device {self.device.describe()} [{self.device_choice}], {processes}; adapters:"
        logger.info("%s", self.adapters.summary_table(title))
        logger.info(
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

    def _progress_bar(self) -> Optional[ProgressBar]:
        setting = self.recipe.runtime.progress_bar
        if not self.dist_env.is_main or setting == "off" or (setting == "auto" and not sys.stderr.isatty()):
            return None
        return ProgressBar(total=self.max_iters, initial=self.iteration)

    def _log_interval(self, interval: _Interval) -> None:
        world = self.dist_env.world_size
        steps = max(interval.steps, 1)
        record: Dict[str, Any] = {
            "kind": "train",
            "iteration": self.iteration,
            "epoch": self.iteration / self.iters_per_epoch,
        }
        record.update({name: value / steps for name, value in interval.terms.items()})
        record["lr"] = self._base_lr()
        record["grad_norm"] = (
            interval.grad_norm / interval.finite_norms if interval.finite_norms else float("nan")
        )
        record["loss_scale"] = self.precision.loss_scale()
        record["skipped_steps"] = interval.skipped
        record["step_time"] = interval.step_time / steps
        record["data_time"] = interval.data_time / steps
        frames = world * self.recipe.data.batch_size_per_device * steps
        record["samples_per_s"] = frames / max(interval.step_time, 1e-9)
        record["peak_memory_mib"] = self.device.peak_memory_mib()
        self.device.reset_peak_memory()
        if self._metrics_log is not None:
            self._metrics_log.write(record)
        self._pace.add(interval.step_time, interval.steps)
        remaining = self._pace.remaining(self.max_iters - self.iteration)
        logger.info(
            "iter %d/%d loss %.4f lr %.3e grad_norm %.3f%s %.3f s/it (data %.3f) eta %s mem %.0f MiB",
            self.iteration, self.max_iters, record["loss"], record["lr"], record["grad_norm"],
            "" if record["loss_scale"] is None else f" scale {record['loss_scale']:g}",
            record["step_time"], record["data_time"], format_duration(remaining),
            record["peak_memory_mib"],
        )

    # -------------------------------------------------------------------------------------- training

    def _set_lr(self) -> None:
        factor = self.lr_schedule(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def _trainable_parameters(self) -> List[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]

    def _gradient_norm(self) -> torch.Tensor:
        """The total gradient norm (clipping the gradients when the recipe says so), on the device."""
        parameters = self._trainable_parameters()
        clip = self.recipe.optimization.grad_clip
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip.max_norm, norm_type=clip.norm_type)
        elif parameters:
            norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])
            norm = torch.linalg.vector_norm(norms)
        else:
            norm = torch.zeros((), device=self.device.torch_device)
        return norm

    def train_step(self, batch: Mapping[str, Any]) -> Dict[str, float]:
        """One iteration on a batch already on the device; returns the rank-mean loss terms and
        ``loss`` (their total), ``grad_norm`` and ``skipped`` (1.0 when no step was taken)."""
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            losses = self.wrapped(batch)
        loss = total_loss(losses)
        names = [name for name, value in losses.items() if torch.is_tensor(value) and value.numel() == 1]
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = self._gradient_norm()
        # Rank means of every term and the total; a NaN anywhere shows on every rank.
        values = torch.stack([losses[name].detach().float().reshape(()) for name in names] + [loss.detach()])
        values = distributed.all_reduce_sum(values) / self.dist_env.world_size
        # One read for every term, the total and the gradient norm (equal on every rank already).
        *host, grad_norm = torch.cat([values, grad_norm.detach().float().reshape(1)]).tolist()
        terms = dict(zip(names, host[:-1]))
        terms["loss"] = host[-1]
        loss_finite = math.isfinite(host[-1])
        if scaler is not None:
            if loss_finite:
                scaler.step(self.optimizer)  # skips by itself when the gradients overflowed
            step_taken = loss_finite and math.isfinite(grad_norm)
            self.precision.update()
        else:
            step_taken = loss_finite and math.isfinite(grad_norm)
            if step_taken:
                self.optimizer.step()
        self._nonfinite_streak = 0 if step_taken else self._nonfinite_streak + 1
        terms["grad_norm"] = grad_norm
        terms["skipped"] = 0.0 if step_taken else 1.0
        return terms

    def _check_nonfinite(self, terms: Mapping[str, float]) -> None:
        limit = self.recipe.runtime.max_nonfinite_steps
        if self._nonfinite_streak == 0:
            return
        logger.warning(
            "iteration %d: non-finite loss or gradient (loss %s, grad_norm %s), step skipped "
            "(%d in a row, limit %d)",
            self.iteration, terms["loss"], terms["grad_norm"], self._nonfinite_streak, limit,
        )
        if self._nonfinite_streak >= limit:
            bad = sorted(name for name, value in terms.items() if not math.isfinite(value))
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
        runtime = self.recipe.runtime
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
                epoch_sampler=self.train_sampler,
            ))
            if runtime.evaluate_at_end:
                self.context.eval_metrics = self.evaluate()
        except BaseException as error:
            self.context.stop_reason = f"{type(error).__name__}: {error}"
            raise
        finally:
            self.context.iteration = self.iteration
            hooks.post_train(context=self.context)
            if self._metrics_log is not None:
                self._metrics_log.close()
        metrics_file = self._metrics_log.path if self._metrics_log is not None else None
        return TrainResult(self.iteration, self.context.eval_metrics, self._last_checkpoint, self.work_dir,
                           metrics_file, self._last_evaluation)

    def _run_iterations(self, batches: Iterator[Any]) -> None:
        runtime = self.recipe.runtime
        bar = self._progress_bar()
        self._pace = IterationPace()
        interval = _Interval()
        device = self.device.torch_device
        tick = time.perf_counter()
        while self.iteration < self.max_iters:
            batch = next(batches)
            data_time = time.perf_counter() - tick
            terms = self.train_step(move_to_device(batch, device))
            self.iteration += 1
            self.context.iteration = self.iteration
            step_time = time.perf_counter() - tick
            tick = time.perf_counter()
            self._accumulate(interval, terms, step_time, data_time)
            self._check_nonfinite(terms)
            if self.iteration % runtime.log_interval == 0 or self.iteration == self.max_iters:
                if self.dist_env.is_main:
                    self._log_interval(interval)
                interval = _Interval()
            if bar is not None:
                bar.update(self.iteration, f"loss {terms['loss']:.4f}")
            if self.iteration % self.checkpoint_interval == 0 or self.iteration == self.max_iters:
                self.save_checkpoint()
            evaluation_due = runtime.eval_interval and self.iteration % runtime.eval_interval == 0
            if evaluation_due and self.iteration < self.max_iters:
                self.evaluate()
            tick = time.perf_counter()
        if bar is not None:
            bar.close()

    @staticmethod
    def _accumulate(
        interval: _Interval, terms: Mapping[str, float], step_time: float, data_time: float
    ) -> None:
        interval.steps += 1
        interval.skipped += int(terms["skipped"])
        for name, value in terms.items():
            if name not in ("grad_norm", "skipped"):
                interval.terms[name] = interval.terms.get(name, 0.0) + value
        if math.isfinite(terms["grad_norm"]):
            interval.grad_norm += terms["grad_norm"]
            interval.finite_norms += 1
        interval.step_time += step_time
        interval.data_time += data_time

    # ------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, Any]:
        """Run the val set (each rank its slice), gather predictions, score them on rank 0.

        Collective: call it on every rank. Returns the metrics on rank 0, an empty dict elsewhere.
        """
        data = self.recipe.data
        distributed.broadcast_buffers(self.model)  # every rank scores with the statistics checkpoints hold
        if self._val_loader is None:
            self._val_dataset = build_dataset(self.recipe, self.host.registries, training=False)
            self._val_loader = self._make_loader(
                self._val_dataset, data.val_batch_size_per_device, training=False
            )
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
            evaluator = self._evaluator or default_evaluator
            metrics = dict(evaluator(merged, self._val_dataset, output_dir))
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
            if self._metrics_log is not None:
                self._metrics_log.write({"kind": "eval", "iteration": self.iteration, **metrics})
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
