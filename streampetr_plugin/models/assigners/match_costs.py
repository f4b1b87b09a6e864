"""Pairwise matching costs between Q predictions and G ground truths (mmdet ``match_cost`` semantics).

Every cost maps batched inputs ``(..., Q, *)`` and ``(..., G, *)`` to a cost matrix ``(..., Q, G)`` already
multiplied by its weight.
"""
from __future__ import annotations

import torch

from streampetr_plugin.models.box_ops import bbox_cxcywh_to_xyxy, bbox_overlaps, bbox_xyxy_to_cxcywh


class FocalLossCost:
    """Focal-loss cost of each ground truth's class: ``pos_cost(p) - neg_cost(p)`` at that class."""

    def __init__(
        self, weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-12
    ) -> None:
        self.weight = weight
        self.alpha = alpha
        self.gamma = gamma
        self.eps = eps

    def __call__(self, cls_logits: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
        """``cls_logits`` (..., Q, C), ``gt_labels`` (..., G) long -> (..., Q, G)."""
        prob = cls_logits.sigmoid()
        neg_cost = -(1 - prob + self.eps).log() * (1 - self.alpha) * prob.pow(self.gamma)
        pos_cost = -(prob + self.eps).log() * self.alpha * (1 - prob).pow(self.gamma)
        class_cost = pos_cost - neg_cost  # (..., Q, C)
        num_gts = gt_labels.size(-1)
        index = gt_labels.long().unsqueeze(-2).expand(*class_cost.shape[:-1], num_gts)  # (..., Q, G)
        return torch.gather(class_cost, -1, index) * self.weight


class BBox3DL1Cost:
    """L1 distance between vectors as given (3D box codes, or normalised 2D centres)."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred`` (..., Q, D), ``target`` (..., G, D) -> (..., Q, G)."""
        return torch.cdist(pred, target, p=1) * self.weight


class BBoxL1Cost:
    """L1 distance between normalised 2D boxes; predictions are (cx, cy, w, h), targets normalised xyxy.

    ``box_format="xywh"`` compares in (cx, cy, w, h) (targets converted), ``"xyxy"`` in corners (predictions
    converted).
    """

    def __init__(self, weight: float = 1.0, box_format: str = "xyxy") -> None:
        if box_format not in ("xyxy", "xywh"):
            raise ValueError(f"unknown box format {box_format!r}")
        self.weight = weight
        self.box_format = box_format

    def __call__(self, pred_cxcywh: torch.Tensor, target_xyxy: torch.Tensor) -> torch.Tensor:
        """``pred_cxcywh`` (..., Q, 4), ``target_xyxy`` (..., G, 4) -> (..., Q, G)."""
        if self.box_format == "xywh":
            target_xyxy = bbox_xyxy_to_cxcywh(target_xyxy)
        else:
            pred_cxcywh = bbox_cxcywh_to_xyxy(pred_cxcywh)
        return torch.cdist(pred_cxcywh, target_xyxy, p=1) * self.weight


class IoUCost:
    """Negative IoU / GIoU between xyxy boxes."""

    def __init__(self, weight: float = 1.0, iou_mode: str = "giou") -> None:
        self.weight = weight
        self.iou_mode = iou_mode

    def __call__(self, pred_xyxy: torch.Tensor, target_xyxy: torch.Tensor) -> torch.Tensor:
        """``pred_xyxy`` (..., Q, 4), ``target_xyxy`` (..., G, 4) -> (..., Q, G)."""
        overlaps = bbox_overlaps(pred_xyxy, target_xyxy, mode=self.iou_mode, is_aligned=False)
        return -overlaps * self.weight
