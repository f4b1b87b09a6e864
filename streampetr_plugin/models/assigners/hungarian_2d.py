"""One-to-one matching of 2D token predictions to ground-truth image boxes (``HungarianAssigner2D``)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch.nn.utils.rnn import pad_sequence

from streampetr_plugin.models.assigners.assign_result import AssignResult
from streampetr_plugin.models.assigners.match_costs import BBox3DL1Cost, BBoxL1Cost, FocalLossCost, IoUCost
from streampetr_plugin.models.assigners.solver import MatchingProblem, solve_matchings
from streampetr_plugin.models.box_ops import bbox_cxcywh_to_xyxy
from streampetr_plugin.models.layers.functional import device_constant


class HungarianAssigner2D:
    """Cost = focal class cost + L1 on normalised (cx, cy, w, h) + GIoU in pixels + L1 on normalised centres.

    Normalisation divides pixels by the **padded** image size.
    """

    def __init__(
        self,
        *,
        cls_weight: float = 2.0,
        reg_weight: float = 5.0,
        iou_weight: float = 2.0,
        centers2d_weight: float = 10.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        self.cls_cost = FocalLossCost(weight=cls_weight, alpha=alpha, gamma=gamma)
        self.reg_cost = BBoxL1Cost(weight=reg_weight, box_format="xywh")
        self.iou_cost = IoUCost(weight=iou_weight, iou_mode="giou")
        self.centers2d_cost = BBox3DL1Cost(weight=centers2d_weight)

    @torch.no_grad()
    def problem(
        self,
        cls_logits: torch.Tensor,
        bbox_preds: torch.Tensor,
        centers2d_preds: torch.Tensor,
        gt_bboxes: Sequence[torch.Tensor],
        gt_labels: Sequence[torch.Tensor],
        gt_centers2d: Sequence[torch.Tensor],
        pad_hw: Tuple[int, int],
    ) -> MatchingProblem:
        """The costs of matching each of N images, computed together on the device.

        Args:
            cls_logits: (N, T, C) class logits of T tokens.
            bbox_preds: (N, T, 4) normalised (cx, cy, w, h).
            centers2d_preds: (N, T, 2) normalised projected centres (u / W, v / H).
            gt_bboxes: N tensors (G_n, 4) xyxy pixels.
            gt_labels: N tensors (G_n,).
            gt_centers2d: N tensors (G_n, 2) pixels.
            pad_hw: (H, W) of the padded input.
        """
        num_gts = [int(g.size(0)) for g in gt_bboxes]
        if max(num_gts, default=0) == 0:
            no_labels = torch.zeros(len(num_gts), 0, dtype=torch.long, device=cls_logits.device)
            return MatchingProblem(cls_logits.new_zeros(cls_logits.shape[:2] + (0,)), no_labels, num_gts)
        pad_h, pad_w = pad_hw
        factor = device_constant([pad_w, pad_h, pad_w, pad_h], bbox_preds)
        boxes = pad_sequence([g.to(bbox_preds) for g in gt_bboxes], batch_first=True)  # (N, G, 4) pixels
        labels = pad_sequence([lbl.to(bbox_preds.device, torch.long) for lbl in gt_labels], batch_first=True)
        centres = pad_sequence([c.to(bbox_preds) for c in gt_centers2d], batch_first=True)  # (N, G, 2) pixels

        cost = (
            self.cls_cost(cls_logits, labels)
            + self.reg_cost(bbox_preds, boxes / factor)
            + self.iou_cost(bbox_cxcywh_to_xyxy(bbox_preds) * factor, boxes)
            + self.centers2d_cost(centers2d_preds, centres / factor[:2])
        )  # (N, T, G)
        return MatchingProblem(cost, labels, num_gts)

    def assign_batch(
        self,
        cls_logits: torch.Tensor,
        bbox_preds: torch.Tensor,
        centers2d_preds: torch.Tensor,
        gt_bboxes: Sequence[torch.Tensor],
        gt_labels: Sequence[torch.Tensor],
        gt_centers2d: Sequence[torch.Tensor],
        pad_hw: Tuple[int, int],
    ) -> List[AssignResult]:
        """Match each of N images independently (arguments of :meth:`problem`; one host copy).

        Returns:
            N :class:`AssignResult` on the CPU.
        """
        problem = self.problem(
            cls_logits, bbox_preds, centers2d_preds, gt_bboxes, gt_labels, gt_centers2d, pad_hw
        )
        return solve_matchings([problem])[0]

    def assign(
        self,
        cls_logits: torch.Tensor,
        bbox_preds: torch.Tensor,
        centers2d_preds: torch.Tensor,
        gt_bboxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_centers2d: torch.Tensor,
        pad_hw: Tuple[int, int],
    ) -> AssignResult:
        """Match one image: (T, C), (T, 4), (T, 2) predictions against (G, 4), (G,), (G, 2) ground truths."""
        return self.assign_batch(
            cls_logits[None],
            bbox_preds[None],
            centers2d_preds[None],
            [gt_bboxes],
            [gt_labels],
            [gt_centers2d],
            pad_hw,
        )[0]
