"""Box encodings and 2D box geometry.

3D boxes follow mmdet3d's ``LiDARInstance3DBoxes`` layout with the **gravity** centre:
``(x, y, z, x_size, y_size, z_size, yaw[, vx, vy])``. The regression code of the 3D head is
``(x, y, z, log x_size, log y_size, log z_size, sin yaw, cos yaw[, vx, vy])``: centres stay in metres
(the reference's ``normalize_bbox`` ignores ``pc_range``).

2D boxes are ``(x1, y1, x2, y2)`` ("xyxy") or ``(cx, cy, w, h)`` ("cxcywh").
"""
from __future__ import annotations

import torch


def normalize_bbox(bboxes: torch.Tensor) -> torch.Tensor:
    """Box (..., 7 | 9) -> regression code (..., 8 | 10): log sizes, (sin, cos) yaw; centres unchanged."""
    centres = bboxes[..., 0:3]
    log_sizes = bboxes[..., 3:6].log()
    yaw = bboxes[..., 6:7]
    parts = [centres, log_sizes, yaw.sin(), yaw.cos()]
    if bboxes.size(-1) > 7:
        parts.append(bboxes[..., 7:9])
    return torch.cat(parts, dim=-1)


def denormalize_bbox(codes: torch.Tensor) -> torch.Tensor:
    """Regression code (..., 8 | 10) -> box (..., 7 | 9): sizes = exp, yaw = atan2(sin, cos)."""
    centres = codes[..., 0:3]
    sizes = codes[..., 3:6].exp()
    yaw = torch.atan2(codes[..., 6:7], codes[..., 7:8])
    parts = [centres, sizes, yaw]
    if codes.size(-1) > 8:
        parts.append(codes[..., 8:10])
    return torch.cat(parts, dim=-1)


def circle_suppression(centres: torch.Tensor, labels: torch.Tensor, radius: float) -> torch.Tensor:
    """Greedy class-wise suppression by centre distance (CenterPoint's circle NMS).

    Args:
        centres: (K, 2) bird's-eye-view centres, metres, in descending order of score.
        labels: (K,) class indices.
        radius: a box within this distance of a kept box of its class is dropped.

    Returns:
        (K,) bool, True for the boxes kept.
    """
    close = (torch.cdist(centres, centres) <= radius) & (labels[:, None] == labels[None, :])  # (K, K)
    keep = torch.ones(len(centres), dtype=torch.bool, device=centres.device)
    for index in range(len(centres)):
        if keep[index]:
            keep[index + 1:] &= ~close[index, index + 1:]
    return keep


def suppress_among_kept(
    centres: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, radius: float
) -> torch.Tensor:
    """:func:`circle_suppression` among the boxes ``keep`` (K,) already keeps; returns the new (K,) mask.

    ``centres`` (K, 2) and ``labels`` (K,) in descending order of score, the dropped boxes included.
    """
    kept = keep.nonzero().squeeze(1)  # (K',) in descending score order
    keep = keep.clone()
    keep[kept] = circle_suppression(centres[kept], labels[kept], radius)
    return keep


def bbox_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def bbox_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (x1, y1, x2, y2) -> (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def bbox_overlaps(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    mode: str = "iou",
    is_aligned: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """IoU / IoF / GIoU of xyxy boxes (mmdet's ``bbox_overlaps``).

    Args:
        boxes1: (..., m, 4); boxes2: (..., n, 4) with the same leading (batch) dims.
        mode: ``"iou"``, ``"iof"`` (intersection over ``boxes1``'s area) or ``"giou"``.
        is_aligned: pairwise for row i of both (then m == n) instead of all pairs.
        eps: floor of the union and of the enclosing area.

    Returns:
        (..., m) if ``is_aligned`` else (..., m, n).
    """
    if mode not in ("iou", "iof", "giou"):
        raise ValueError(f"unknown overlap mode {mode!r}")
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    if is_aligned:
        first, second = boxes1, boxes2
        area_first, area_second = area1, area2
    else:
        first, second = boxes1[..., :, None, :], boxes2[..., None, :, :]  # (..., m, 1, 4), (..., 1, n, 4)
        area_first, area_second = area1[..., :, None], area2[..., None, :]

    top_left = torch.max(first[..., :2], second[..., :2])
    bottom_right = torch.min(first[..., 2:], second[..., 2:])
    overlap_wh = (bottom_right - top_left).clamp(min=0)
    overlap = overlap_wh[..., 0] * overlap_wh[..., 1]
    if mode == "iof":
        union = area_first
    else:
        union = area_first + area_second - overlap
    eps_tensor = union.new_full((1,), eps)  # filled on the device: no host-to-device copy
    union = torch.max(union, eps_tensor)
    ious = overlap / union
    if mode != "giou":
        return ious

    enclose_top_left = torch.min(first[..., :2], second[..., :2])
    enclose_bottom_right = torch.max(first[..., 2:], second[..., 2:])
    enclose_wh = (enclose_bottom_right - enclose_top_left).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], eps_tensor)
    return ious - (enclose_area - union) / enclose_area
