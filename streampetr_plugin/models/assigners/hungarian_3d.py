"""One-to-one matching of 3D query predictions to ground-truth boxes (reference ``HungarianAssigner3D``)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from streampetr_plugin.models.assigners.assign_result import AssignResult
from streampetr_plugin.models.assigners.match_costs import BBox3DL1Cost, FocalLossCost
from streampetr_plugin.models.assigners.solver import MatchingProblem, solve_matchings
from streampetr_plugin.models.box_ops import normalize_bbox


class HungarianAssigner3D:
    """Cost = focal class cost + L1 between the box codes, both weighted; solved with the Hungarian algorithm.

    The L1 cost compares ``pred * code_weights`` with ``normalize_bbox(gt) * code_weights`` over the first 8
    dims (centre in metres, log sizes, sin/cos yaw), or all 10 when ``with_velo``. (The reference also builds
    an IoU cost of weight 0 that it never evaluates; it is omitted.)
    """

    def __init__(
        self, *, cls_weight: float = 2.0, reg_weight: float = 0.25, alpha: float = 0.25, gamma: float = 2.0
    ) -> None:
        self.cls_cost = FocalLossCost(weight=cls_weight, alpha=alpha, gamma=gamma)
        self.reg_cost = BBox3DL1Cost(weight=reg_weight)

    @torch.no_grad()
    def problem(
        self,
        cls_logits: torch.Tensor,
        bbox_preds: torch.Tensor,
        gt_bboxes: Sequence[torch.Tensor],
        gt_labels: Sequence[torch.Tensor],
        code_weights: Optional[torch.Tensor] = None,
        with_velo: bool = False,
    ) -> MatchingProblem:
        """The costs of matching each of N samples, computed together on the device.

        Args:
            cls_logits: (N, Q, C) class logits.
            bbox_preds: (N, Q, 10) box codes (metric centres, log sizes, sin, cos, vx, vy).
            gt_bboxes: N tensors (G_n, 9) gravity-centre boxes.
            gt_labels: N tensors (G_n,) class indices.
            code_weights: (10,) per-dim weights of the L1 cost, or None.
            with_velo: include the velocity dims in the L1 cost.
        """
        num_gts = [int(g.size(0)) for g in gt_bboxes]
        if max(num_gts, default=0) == 0:
            no_labels = torch.zeros(len(num_gts), 0, dtype=torch.long, device=cls_logits.device)
            return MatchingProblem(cls_logits.new_zeros(cls_logits.shape[:2] + (0,)), no_labels, num_gts)
        # Padding boxes have unit sizes so their (unused) codes stay finite.
        padded_boxes = pad_sequence(
            [g.to(bbox_preds) for g in gt_bboxes], batch_first=True, padding_value=1.0
        )  # (N, G, 9)
        padded_labels = pad_sequence(
            [label.to(bbox_preds.device, torch.long) for label in gt_labels], batch_first=True
        )  # (N, G)
        gt_codes = normalize_bbox(padded_boxes)  # (N, G, 10)
        if code_weights is not None:
            bbox_preds = bbox_preds * code_weights
            gt_codes = gt_codes * code_weights
        num_dims = bbox_preds.size(-1) if with_velo else 8
        cost = self.cls_cost(cls_logits, padded_labels) + self.reg_cost(
            bbox_preds[..., :num_dims], gt_codes[..., :num_dims]
        )  # (N, Q, G)
        return MatchingProblem(cost, padded_labels, num_gts)

    def assign_batch(
        self,
        cls_logits: torch.Tensor,
        bbox_preds: torch.Tensor,
        gt_bboxes: Sequence[torch.Tensor],
        gt_labels: Sequence[torch.Tensor],
        code_weights: Optional[torch.Tensor] = None,
        with_velo: bool = False,
    ) -> List[AssignResult]:
        """Match each of N samples independently (arguments of :meth:`problem`; one host copy).

        Returns:
            N :class:`AssignResult` on the CPU.
        """
        return solve_matchings(
            [self.problem(cls_logits, bbox_preds, gt_bboxes, gt_labels, code_weights, with_velo)]
        )[0]

    def assign(
        self,
        cls_logits: torch.Tensor,
        bbox_preds: torch.Tensor,
        gt_bboxes: torch.Tensor,
        gt_labels: torch.Tensor,
        code_weights: Optional[torch.Tensor] = None,
        with_velo: bool = False,
    ) -> AssignResult:
        """Match one sample: logits (Q, C), box codes (Q, 10), GT boxes (G, 9) and labels (G,)."""
        return self.assign_batch(
            cls_logits[None], bbox_preds[None], [gt_bboxes], [gt_labels], code_weights, with_velo
        )[0]
