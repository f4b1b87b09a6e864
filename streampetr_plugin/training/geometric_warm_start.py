"""Geometric warm start: align StreamPETR's position embeddings with the cameras before training.

Why. PETR-style cross-attention is meant to be geometric: a query at the 3D point p should attend to the
image tokens that p projects into. Nothing in the model says so; the query embedding and the image-token
3D position embedding are MLPs that have to discover it. Trained from scratch (no pre-trained backbone,
a few thousand iterations: the CPU demo), they do not: with an untrained backbone the object tokens carry
no usable content, so the decoder learns to attend to tokens that look the same in every frame (sky,
ground next to the car), which makes its prior prediction least noisy, and it stays there (docs/demo.md
has the measurements). Large-scale training escapes this with a pre-trained backbone and tens of
thousands of iterations.

What. Before the first iteration, Adam minimises the geometric alignment loss
(:mod:`streampetr_plugin.models.losses.geometric_alignment`) of fresh queries at random points against the
keys of real training frames. It uses the camera calibration and the untrained image features only: no
labels. It trains :func:`warm_start_parameters` (query embedding, 3D position encoder, its feature gate
and the cross-attention in-projections; the value rows get no gradient); everything else is left as it
was. Keep those modules on a small learning-rate multiplier in the main training so that the alignment
survives the first iterations (the CPU demo uses 0.02).

Guidance. The same loss can stay on during training as an auxiliary, label-free term on every frame's
keys (the head's ``geometric_guidance_weight``): without it, some seeds of the CPU demo still fall back into
the attention-on-constant-tokens state within a few hundred iterations (docs/demo.md).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.models.detector import token_locations
from streampetr_plugin.models.losses.geometric_alignment import alignment_loss
from streampetr_plugin.training.batches import move_to_device
from streampetr_plugin.training.distributed import DistributedEnv

logger = logging.getLogger(__name__)

# The "rank" part of the augmentation draw keys of the warm start's frames: no real rank is this large,
# so they never repeat a training draw.
WARM_START_DRAW_KEY = 2**31 - 1


@dataclass(frozen=True)
class WarmStartResult:
    """What :func:`geometric_warm_start` did: cross-entropy at the first and last step, and the share of
    the attention that fell on the target tokens before and after (mean over points, heads, layers)."""

    steps: int
    first_loss: float
    last_loss: float
    first_target_attention: float
    last_target_attention: float


def warm_start_parameters(head: nn.Module) -> List[nn.Parameter]:
    """The parameters the warm start trains: query embedding, 3D position encoder and its feature gate,
    and the packed in-projection of every decoder cross-attention."""
    params = [*head.query_embedding.parameters(), *head.position_encoder.parameters(),
              *head.featurized_pe.parameters()]
    for layer in head.transformer.decoder.layers:
        params += [layer.attentions[1].attn.in_proj_weight, layer.attentions[1].attn.in_proj_bias]
    return params


def geometric_warm_start(
    detector: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    *,
    steps: int,
    lr: float,
    num_points: int,
    generator: torch.Generator,
) -> WarmStartResult:
    """Run ``steps`` Adam steps of :func:`alignment_loss` on the frames of ``batches`` (training batches on
    the detector's device, used in turn), ``num_points`` random points per frame and step.

    The image features of each batch are computed once, without gradients; batch-norm statistics and
    every parameter outside :func:`warm_start_parameters` are left unchanged, and no gradient is left
    behind.
    """
    if steps < 1 or not batches:
        raise ValueError("the geometric warm start needs steps >= 1 and at least one batch")
    head = getattr(detector, "pts_bbox_head", None)
    if not all(hasattr(head, name) for name in ("image_keys", "fresh_query_positions", "transformer")):
        raise ValueError(
            f"optimization.geometric_warm_start needs a StreamPETR head ({type(detector).__name__} has "
            f"{type(head).__name__}); set optimization.geometric_warm_start.steps=0"
        )
    buffers = {name: buffer.clone() for name, buffer in detector.named_buffers()}
    prepared: List[Dict[str, Any]] = []
    with torch.no_grad():
        for batch in batches:
            img = batch["img"]
            img_feats = detector.extract_img_feats(img)  # (B, N, C, h, w)
            pad_hw = (int(img.shape[-2]), int(img.shape[-1]))
            height, width = img_feats.shape[-2:]
            location = token_locations(height, width, stride=detector.stride, pad_hw=pad_hw,
                                       device=img.device)
            location = location.unsqueeze(0).expand(img_feats.shape[0] * img_feats.shape[1], -1, -1, -1)
            prepared.append({"img_feats": img_feats, "location": location, "pad_shape": pad_hw,
                             "intrinsics": batch["intrinsics"], "lidar2img": batch["lidar2img"]})
        for name, buffer in detector.named_buffers():  # batch norm ran in training mode: restore it
            buffer.copy_(buffers[name])

    params = warm_start_parameters(head)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses, shares = [], []
    for step in range(steps):
        inputs = prepared[step % len(prepared)]
        batch_size = inputs["img_feats"].shape[0]
        device = inputs["img_feats"].device
        reference_points = torch.rand(batch_size, num_points, 3, generator=generator).to(device)
        memory, pos_embed = head.image_keys(**inputs)
        loss, share = alignment_loss(
            head, keys=memory + pos_embed, lidar2img=inputs["lidar2img"], pad_shape=inputs["pad_shape"],
            feature_hw=tuple(inputs["img_feats"].shape[-2:]), stride=detector.stride,
            reference_points=reference_points,
        )
        # autograd.grad, not backward(): nothing accumulates into other parameters, and the gradient
        # accumulation hooks of a DistributedDataParallel wrapper around the detector never fire.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        losses.append(float(loss.detach()))
        shares.append(float(share))
    detector.zero_grad(set_to_none=True)
    return WarmStartResult(steps=steps, first_loss=losses[0], last_loss=losses[-1],
                           first_target_attention=shares[0], last_target_attention=shares[-1])


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
