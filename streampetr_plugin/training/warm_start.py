"""The geometric warm start of a run: the head's position embeddings aligned with the cameras before
iteration 0, without labels (``optimization.geometric_warm_start``, docs/demo.md)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.training.batches import move_to_device
from streampetr_plugin.training.distributed import DistributedEnv

logger = logging.getLogger(__name__)

# The "rank" part of the augmentation draw keys of the warm start's frames: no real rank is this large,
# so they never repeat a training draw.
WARM_START_DRAW_KEY = 2**31 - 1


def run_geometric_warm_start(
    model: nn.Module,
    dataset: Any,
    *,
    collate: Callable[[list], Any],
    recipe: Recipe,
    device: torch.device,
    dist_env: DistributedEnv,
) -> None:
    """Warm-start ``model``'s head on frames spread over the training ``dataset``, the same on every rank;
    rank 0's result is broadcast. GridMask is off meanwhile: the features of the clean images."""
    from streampetr_plugin.models.heads.geometric_warm_start import (
        geometric_warm_start,
        warm_start_parameters,
    )

    options = recipe.optimization.geometric_warm_start
    indices = np.linspace(0, len(dataset) - 1, num=min(options.frames, len(dataset))).round().astype(int)
    keyed = getattr(dataset, "accepts_draw_keys", False)
    frames = [dataset[(int(index), (WARM_START_DRAW_KEY, slot))] if keyed else dataset[int(index)]
              for slot, index in enumerate(indices)]
    size = recipe.data.batch_size_per_device
    batches = [move_to_device(collate(frames[i:i + size]), device) for i in range(0, len(frames), size)]
    started = time.perf_counter()
    use_grid_mask = getattr(model, "use_grid_mask", False)
    model.use_grid_mask = False
    try:
        result = geometric_warm_start(
            model, batches, steps=options.steps, lr=options.lr, num_points=options.points,
            generator=torch.Generator().manual_seed(recipe.runtime.seed),
        )
    finally:
        model.use_grid_mask = use_grid_mask
    if dist_env.is_distributed:
        for param in warm_start_parameters(model.pts_bbox_head):
            torch.distributed.broadcast(param.data, src=0)
    if dist_env.is_main:
        logger.info(
            "geometric warm start: %d steps on %d frames in %.1f s; cross-entropy %.3f -> %.3f, "
            "attention on the projected tokens %.3f -> %.3f",
            result.steps, len(frames), time.perf_counter() - started, result.first_loss,
            result.last_loss, result.first_target_attention, result.last_target_attention,
        )
