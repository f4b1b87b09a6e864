"""Geometric alignment loss: how far the cross-attention of a fresh query at a 3D point is from the image
tokens the point projects into.

PETR-style cross-attention is meant to be geometric: a query at the 3D point p should attend to the image
tokens that p projects into. For random points p in ``pc_range``, the cross-attention logits of every
decoder layer, between the position embedding a fresh query at p gets and the keys of a frame (image
memory + 3D position embedding), are scored by cross-entropy against a target that puts the attention on
the token p projects into (and a quarter of that weight on its 8 neighbours), in every camera that sees
p. It needs the camera calibration and the image features only: no labels.

Two users: the geometric warm start (:mod:`streampetr_plugin.training.geometric_warm_start`) minimises
it before training, and the StreamPETR head adds it as an auxiliary, label-free training term on every
frame's keys (its ``geometric_guidance_weight``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

NEIGHBOUR_WEIGHT = 0.25  # target weight of the 8 tokens around the one a point projects into
MIN_DEPTH_M = 0.5  # points closer to a camera's image plane than this count as not seen by it


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
