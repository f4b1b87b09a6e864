"""Geometric warm start: align StreamPETR's position embeddings with the cameras before training.

Why. PETR-style cross-attention is meant to be geometric: a query at the 3D point p should attend to the
image tokens that p projects into. Nothing in the model says so; the query embedding and the image-token
3D position embedding are MLPs that have to discover it. Trained from scratch (no pre-trained backbone,
a few thousand iterations: the CPU demo), they do not: with an untrained backbone the object tokens carry
no usable content, so the decoder learns to attend to tokens that look the same in every frame (sky,
ground next to the car), which makes its prior prediction least noisy, and it stays there (docs/demo.md
has the measurements). Large-scale training escapes this with a pre-trained backbone and tens of
thousands of iterations.

What. Before the first iteration, for random points p in ``pc_range`` the cross-attention logits of every
decoder layer, between the position embedding a fresh query at p gets and the keys of real training
frames (image memory + 3D position embedding), are trained by cross-entropy to put the attention on the
token p projects into (and a quarter of that weight on its 8 neighbours), in every camera that sees p.
It uses the camera calibration and the untrained image features only: no labels. It trains
:func:`warm_start_parameters` (query embedding, 3D position encoder, its feature gate and the
cross-attention in-projections; the value rows get no gradient); everything else is left as it was.
Keep those modules on a small learning-rate multiplier in the main training so that the alignment
survives the first iterations (the CPU demo uses 0.02).

Guidance. The same loss can stay on during training as an auxiliary, label-free term on every frame's
keys (the head's ``geometric_guidance_weight``): without it, some seeds of the CPU demo still fall back into
the attention-on-constant-tokens state within a few hundred iterations (docs/demo.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

NEIGHBOUR_WEIGHT = 0.25  # target weight of the 8 tokens around the one a point projects into
MIN_DEPTH_M = 0.5  # points closer to a camera's image plane than this count as not seen by it


@dataclass(frozen=True)
class WarmStartResult:
    """What :func:`geometric_warm_start` did: cross-entropy at the first and last step, and the share of
    the attention that fell on the target tokens before and after (mean over points, heads, layers)."""

    steps: int
    first_loss: float
    last_loss: float
    first_target_attention: float
    last_target_attention: float


def projection_targets(
    points: torch.Tensor,
    lidar2img: torch.Tensor,
    *,
    pad_hw: Tuple[int, int],
    feature_hw: Tuple[int, int],
    stride: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Target attention of queries at ``points`` over the image tokens.

    Args:
        points: (B, P, 3) in the LiDAR frame.
        lidar2img: (B, N, 4, 4) LiDAR -> padded-image pixels.
        pad_hw: padded image (height, width); feature_hw: token grid (h, w) per camera; ``stride`` pixels
            per token (token (i, j) covers pixels [stride j, stride (j + 1)) x [stride i, stride (i + 1))).

    Returns:
        target (B, P, N * h * w): weight 1 on the token containing the projection and
        ``NEIGHBOUR_WEIGHT`` on its neighbours, in every camera that sees the point, normalised to sum 1
        (all zero for a point no camera sees); visible (B, P) bool.
    """
    batch, num_points, _ = points.shape
    num_cams = lidar2img.shape[1]
    height, width = feature_hw
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, P, 4)
    projected = torch.einsum("bnij,bpj->bnpi", lidar2img.float(), homogeneous.float())  # (B, N, P, 4)
    depth = projected[..., 2]
    u = projected[..., 0] / depth.clamp(min=1e-6)
    v = projected[..., 1] / depth.clamp(min=1e-6)
    seen = (depth > MIN_DEPTH_M) & (u >= 0) & (u < pad_hw[1]) & (v >= 0) & (v < pad_hw[0])  # (B, N, P)
    column = (u / stride).floor().long().clamp(0, width - 1)
    row = (v / stride).floor().long().clamp(0, height - 1)
    margin_width = width + 2  # one cell of margin on every side
    target = points.new_zeros(batch, num_points, num_cams, (height + 2) * margin_width)
    # Dense over every (point, camera): a camera that does not see the point adds 0, so no indexing by
    # the seen pairs (whose number the host would have to wait for). Each cell gets one addition.
    centre_row, centre_col = row.transpose(1, 2) + 1, column.transpose(1, 2) + 1  # (B, P, N)
    seen_weight = seen.transpose(1, 2).to(target.dtype)  # (B, P, N)
    for d_row in (-1, 0, 1):
        for d_col in (-1, 0, 1):
            weight = 1.0 if d_row == 0 and d_col == 0 else NEIGHBOUR_WEIGHT
            cell = (centre_row + d_row) * margin_width + centre_col + d_col  # (B, P, N)
            target.scatter_add_(-1, cell[..., None], (seen_weight * weight)[..., None])
    target = target.view(batch, num_points, num_cams, height + 2, margin_width)[..., 1:-1, 1:-1]
    target = target.reshape(batch, num_points, num_cams * height * width)
    total = target.sum(dim=-1, keepdim=True)
    return target / total.clamp(min=1e-12), total[..., 0] > 0


def warm_start_parameters(head: nn.Module) -> List[nn.Parameter]:
    """The parameters the warm start trains: query embedding, 3D position encoder and its feature gate,
    and the packed in-projection of every decoder cross-attention."""
    params = [*head.query_embedding.parameters(), *head.position_encoder.parameters(),
              *head.featurized_pe.parameters()]
    for layer in head.transformer.decoder.layers:
        params += [layer.attentions[1].attn.in_proj_weight, layer.attentions[1].attn.in_proj_bias]
    return params


def alignment_loss(
    head: nn.Module,
    *,
    keys: torch.Tensor,
    lidar2img: torch.Tensor,
    pad_shape: Tuple[int, int],
    feature_hw: Tuple[int, int],
    stride: int,
    reference_points: torch.Tensor,
    token_order: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy between each decoder layer's cross-attention of fresh queries at ``reference_points``
    (B, P, 3), normalised to ``pc_range``, and :func:`projection_targets`; and the attention share on
    the target tokens. Both are means over visible points, heads and layers.

    ``keys`` (B, L, C) are the image memory plus its 3D position embedding (``head.image_keys``), tokens
    camera-major (N, h, w), or in ``token_order`` (B, L) (indices into that order: the 2D head's ranking).
    """
    query_pos = head.fresh_query_positions(reference_points)  # (B, P, C)
    low, high = head.pc_range[0:3], head.pc_range[3:6]
    target, visible = projection_targets(
        reference_points * (high - low) + low, lidar2img, pad_hw=pad_shape, feature_hw=feature_hw,
        stride=stride,
    )  # (B, P, N h w), (B, P)
    if token_order is not None:
        target = target.gather(-1, token_order[:, None, :].expand(-1, target.shape[1], -1))
    weight = visible.float()[:, None]  # (B, 1, P)
    count = weight.sum().clamp(min=1.0)
    on_target = (target > 0).float()[:, None]  # (B, 1, P, L)
    losses, shares = [], []
    for layer in head.transformer.decoder.layers:
        cross_attention = layer.attentions[1].attn
        log_probs = cross_attention.attention_logits(query_pos, keys).log_softmax(dim=-1)  # (B, h, P, L)
        heads = log_probs.shape[1]
        cross_entropy = -(log_probs * target[:, None]).sum(dim=-1)  # (B, h, P)
        losses.append((cross_entropy * weight).sum() / (count * heads))
        share = (log_probs.exp() * on_target).sum(dim=-1)  # (B, h, P)
        shares.append((share * weight).sum() / (count * heads))
    return torch.stack(losses).mean(), torch.stack(shares).mean().detach()


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
    from streampetr_plugin.models.detector import token_locations

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
