"""Start-up of a run, the same for training, evaluation and the benchmark: device, model, optimiser, length.

Each step needs the one before:

1. :func:`select_device`: a candidate device from the recipe and what is installed (a plugin's
   ``streampetr_select_accelerator`` first), the ENVIRONMENT adapters (variables that must exist before
   the device runtime loads), the device confirmed, the RUNTIME adapters, and the process's device made
   current (a clear error when ``LOCAL_RANK`` exceeds the visible devices);
2. :func:`seed_everything`, then :func:`build_device_model`: the model built on the CPU
   (``streampetr_post_model_build``), given the ``load_from`` weights when asked, moved to the device, the
   MODEL adapters, the precision scope; :func:`wrap_for_ranks` puts the DDP wrapper around it when there
   are several processes;
3. :func:`build_run_optimizer`: the OPTIMIZER adapters, then the optimiser over the model's
   learning-rate groups (each group remembers its ``initial_lr`` for the schedule);
4. :func:`iteration_plan`: iterations per epoch, run length and checkpoint interval (the reference's
   accounting; the MindSpeed-MM settings use the same).
"""
from __future__ import annotations

import inspect
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, MutableMapping, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from streampetr_plugin.adapters.base import AdapterContext, AdapterRunner, Phase
from streampetr_plugin.adapters.device import (
    DeviceHandle,
    candidate_device,
    confirm_device,
    device_for_local_rank,
)
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.errors import InputError, describe
from streampetr_plugin.models.build import build_model
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.training.distributed import DistributedEnv
from streampetr_plugin.training.optimizers import build_optimizer
from streampetr_plugin.training.precision import MixedPrecision

if TYPE_CHECKING:
    from streampetr_plugin.interop.checkpoint import LoadReport

logger = logging.getLogger(__name__)


@dataclass
class DeviceSelection:
    """The device this process drives, how it was chosen, and the adapters run for it so far (their
    runner and context go on to the MODEL and OPTIMIZER phases)."""

    device: DeviceHandle
    how: str
    adapters: AdapterRunner
    context: AdapterContext


def _adapters_for(
    recipe: Recipe, host: PluginHost, kind: str, dist_env: DistributedEnv, environ: MutableMapping[str, str]
) -> tuple:
    context = AdapterContext(
        device=kind,
        environ=environ,
        rank=dist_env.rank,
        local_rank=dist_env.local_rank,
        world_size=dist_env.world_size,
        local_world_size=dist_env.local_world_size,
        recipe=recipe,
        registries=host.registries,
    )
    return AdapterRunner.from_recipe(recipe, kind, host.registries), context


def select_device(
    recipe: Recipe,
    host: PluginHost,
    *,
    dist_env: Optional[DistributedEnv] = None,
    environ: Optional[MutableMapping[str, str]] = None,
) -> DeviceSelection:
    """Step 1 of the module docstring, for the process ``dist_env`` describes (default: one process)."""
    dist_env = dist_env if dist_env is not None else DistributedEnv()
    environ = os.environ if environ is None else environ
    candidate, how = candidate_device(recipe.accelerator.device, hooks=host.hooks, environ=environ)
    adapters, context = _adapters_for(recipe, host, candidate, dist_env, environ)
    adapters.run(Phase.ENVIRONMENT, context)
    kind, how = confirm_device(candidate, how)
    if kind != candidate:
        adapters, context = _adapters_for(recipe, host, kind, dist_env, environ)
        adapters.run(Phase.ENVIRONMENT, context)
    adapters.run(Phase.RUNTIME, context)
    device = device_for_local_rank(kind, dist_env.local_rank)
    device.activate()
    return DeviceSelection(device=device, how=how, adapters=adapters, context=context)


def selection_for(recipe: Recipe, host: PluginHost, device: DeviceHandle, *, how: str) -> DeviceSelection:
    """A fresh adapter runner and context for ``device``, already selected and made current: another
    configuration of the same process (the benchmark builds several) runs its MODEL and OPTIMIZER
    adapters on its own."""
    adapters, context = _adapters_for(recipe, host, device.kind, DistributedEnv(), os.environ)
    return DeviceSelection(device=device, how=how, adapters=adapters, context=context)


def load_reference_weights(model: nn.Module, path: str, *, key: str) -> "LoadReport":
    """``path``'s weights (ours or a reference ``.pth``) into ``model``; :class:`InputError` naming ``key``
    when the file is missing."""
    from streampetr_plugin.interop.checkpoint import load_reference_checkpoint

    if not Path(path).is_file():
        raise InputError(describe(
            key, f"{path} does not exist",
            "reference weights: see docs/reproducing.md; runtime.load_from=null trains from the "
            "initialisation",
        ))
    return load_reference_checkpoint(model, path)


def build_device_model(
    recipe: Recipe, host: PluginHost, selection: DeviceSelection, *, load_from: Optional[str] = None
) -> tuple:
    """Step 2 of the module docstring; returns ``(model, precision)``, the model unwrapped on its device
    (``load_from``: weights to start from, None: the initialisation)."""
    model = build_model(recipe, host.registries)
    host.hooks.post_model_build(model=model, recipe=recipe)
    if load_from:
        report = load_reference_weights(model, load_from, key="runtime.load_from")
        logger.info("load_from: %s", report.summary())
    model.to(selection.device.torch_device)
    selection.context.model = model
    selection.adapters.run(Phase.MODEL, selection.context)
    precision = MixedPrecision(recipe.optimization.amp, selection.device)
    precision.configure_model(model)
    return model, precision


def build_run_optimizer(
    model: nn.Module, recipe: Recipe, host: PluginHost, selection: DeviceSelection
) -> torch.optim.Optimizer:
    """Step 3 of the module docstring."""
    selection.adapters.run(Phase.OPTIMIZER, selection.context)
    optimizer = build_optimizer(model, recipe, selection.context, host.registries)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def seed_everything(seed: int, device: DeviceHandle) -> None:
    """Python, numpy, torch and the device's generators seeded alike; the same seed on every rank, as the
    reference (mmdet3d's train.py without --diff-seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.module is not None:
        device.module.manual_seed_all(seed)


def _no_buffer_broadcast() -> Dict[str, bool]:
    """DDP's switch for "do not broadcast buffers before each forward" (the reference's
    ``broadcast_buffers=False``), under the name this torch version uses."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap_for_ranks(model: nn.Module, selection: DeviceSelection, dist_env: DistributedEnv) -> nn.Module:
    """What the batches go through: ``model`` itself in one process, else its DDP wrapper
    (``find_unused_parameters=False``, no buffer broadcast before each forward, plus the adapters' options;
    the trainer broadcasts rank 0's buffers before every evaluation and checkpoint instead)."""
    if not dist_env.is_distributed:
        return model
    device = selection.device
    return DistributedDataParallel(
        model,
        device_ids=None if device.kind == "cpu" else [device.index],
        find_unused_parameters=False,
        **_no_buffer_broadcast(),
        **selection.context.ddp_options,
    )


@dataclass(frozen=True)
class IterationPlan:
    """How long a run is: ``iters_per_epoch``, ``max_iters`` and ``checkpoint_interval`` (iterations)."""

    iters_per_epoch: int
    max_iters: int
    checkpoint_interval: int


def iteration_plan(recipe: Recipe, *, num_samples: int, world_size: int) -> IterationPlan:
    """The reference's accounting: ``data.num_train_samples`` (else ``num_samples``, the dataset's length)
    // (processes x frames per process) iterations per epoch unless ``runtime.iters_per_epoch`` says,
    ``runtime.max_iters`` or ``epochs`` of them, a checkpoint every ``runtime.checkpoint_interval`` or
    every epoch."""
    runtime, data = recipe.runtime, recipe.data
    samples = data.num_train_samples or num_samples
    iters_per_epoch = runtime.iters_per_epoch or max(1, samples // (world_size * data.batch_size_per_device))
    max_iters = runtime.max_iters or runtime.epochs * iters_per_epoch
    return IterationPlan(iters_per_epoch, max_iters, runtime.checkpoint_interval or iters_per_epoch)
