"""The 3D head's training loss: per-decoder-layer Hungarian matching + focal / L1, and the denoising losses.

Reference: ``StreamPETRHead.loss`` with ``loss_single``, ``dn_loss_single``, ``prepare_for_loss`` and
``get_targets`` (streampetr_head.py:661-1012). The normalisers, which a port easily gets wrong:

- focal classification of matching queries: ``max(local matched count, 1)`` (all-reduced only with
  ``sync_cls_avg_factor``);
- L1 of matching queries: ``max(all-reduced mean matched count, 1)``;
- denoising classification: ``max(num_dn * 3.14159 / 6 * split^3, 1)`` (the expected number of positive
  copies), denoising L1: ``max(all-reduced num_dn, 1)`` over **every** denoising query, including those
  relabelled as background.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from streampetr_plugin.models.assigners.assign_result import AssignResult
from streampetr_plugin.models.assigners.hungarian_3d import HungarianAssigner3D
from streampetr_plugin.models.assigners.solver import MatchingProblem, solve_matchings
from streampetr_plugin.models.box_ops import normalize_bbox
from streampetr_plugin.models.layers.functional import (
    classification_normaliser,
    mean_count_over_ranks,
    upload,
)
from streampetr_plugin.models.losses.focal_loss import FocalLoss
from streampetr_plugin.models.losses.l1_loss import L1Loss


class StreamPETRCriterionParams(BaseModel):
    """Loss and matching weights of :class:`StreamPETRCriterion` (defaults: the V2-99 recipe); the settings it
    shares with the head's denoising queries are the head's (:class:`StreamPETRHeadParams`)."""

    model_config = ConfigDict(extra="forbid")

    cls_gamma: float = Field(default=2.0, ge=0, description="Focal loss gamma of the classification loss.")
    cls_alpha: float = Field(default=0.25, ge=0, le=1, description="Focal loss alpha (classification).")
    cls_loss_weight: float = Field(default=2.0, ge=0, description="Weight of the focal classification loss.")
    bbox_loss_weight: float = Field(default=0.25, ge=0, description="Weight of the L1 box-code loss.")
    assigner_cls_weight: float = Field(default=2.0, ge=0, description="Focal cost weight of the 3D matching.")
    assigner_reg_weight: float = Field(default=0.25, ge=0, description="L1 box cost weight, 3D matching.")
    sync_cls_avg_factor: bool = Field(
        default=False, description="All-reduce the classification normaliser across ranks (reference: off)."
    )


class StreamPETRCriterion(nn.Module):
    """Loss of the StreamPETR 3D head over all decoder layers (no parameters, no state).

    Args:
        params: the loss and matching weights.
        num_classes: number of classes (this label = background).
        match_with_velo: include velocity in the matching L1 cost.
        with_dn: report denoising losses (query denoising enabled).
        dn_weight: weight of the denoising losses.
        split: denoising jitter norm beyond which a copy's target is background.
    """

    def __init__(
        self,
        params: StreamPETRCriterionParams,
        *,
        num_classes: int,
        match_with_velo: bool,
        with_dn: bool,
        dn_weight: float,
        split: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.match_with_velo = match_with_velo
        self.sync_cls_avg_factor = params.sync_cls_avg_factor
        self.with_dn = with_dn
        self.dn_weight = dn_weight
        self.split = split
        self.assigner = HungarianAssigner3D(
            cls_weight=params.assigner_cls_weight,
            reg_weight=params.assigner_reg_weight,
            alpha=params.cls_alpha,
            gamma=params.cls_gamma,
        )
        self.loss_cls = FocalLoss(
            gamma=params.cls_gamma, alpha=params.cls_alpha, loss_weight=params.cls_loss_weight
        )
        self.loss_bbox = L1Loss(loss_weight=params.bbox_loss_weight)

    def matching_problem(
        self,
        all_cls_scores: torch.Tensor,
        all_bbox_preds: torch.Tensor,
        gt_bboxes_3d: Sequence[torch.Tensor],
        gt_labels_3d: Sequence[torch.Tensor],
        match_costs: Optional[torch.Tensor],
    ) -> MatchingProblem:
        """The costs of the Hungarian matching of every layer and sample, computed in one batch.

        Args:
            all_cls_scores: (L, B, Q, C) logits. all_bbox_preds: (L, B, Q, 10) box codes.
            gt_bboxes_3d: B tensors (n_b, 9) gravity-centre boxes. gt_labels_3d: B tensors (n_b,).
            match_costs: (10,) per-dim weights of the L1 matching cost.

        Returns:
            The problem of the L * B (layer-major) samples; :meth:`forward` takes its solution.
        """
        device = all_cls_scores.device
        num_layers = all_cls_scores.size(0)
        return self.assigner.problem(
            all_cls_scores.flatten(0, 1),
            all_bbox_preds.flatten(0, 1),
            [g.to(device) for g in gt_bboxes_3d] * num_layers,
            [g.to(device) for g in gt_labels_3d] * num_layers,
            code_weights=match_costs,
            with_velo=self.match_with_velo,
        )

    def match(
        self,
        all_cls_scores: torch.Tensor,
        all_bbox_preds: torch.Tensor,
        gt_bboxes_3d: Sequence[torch.Tensor],
        gt_labels_3d: Sequence[torch.Tensor],
        match_costs: Optional[torch.Tensor],
    ) -> List[List[AssignResult]]:
        """Hungarian matching of every layer and sample (the arguments of :meth:`matching_problem`).

        Returns:
            ``result[l][b]``: the :class:`AssignResult` of layer l, sample b.
        """
        problem = self.matching_problem(
            all_cls_scores, all_bbox_preds, gt_bboxes_3d, gt_labels_3d, match_costs
        )
        return _by_layer(solve_matchings([problem])[0], all_cls_scores.size(1))

    def forward(
        self,
        all_cls_scores: torch.Tensor,
        all_bbox_preds: torch.Tensor,
        dn_mask_dict: Optional[dict],
        gt_bboxes_3d: Sequence[torch.Tensor],
        gt_labels_3d: Sequence[torch.Tensor],
        code_weights: torch.Tensor,
        match_costs: Optional[torch.Tensor],
        assignments: Optional[Sequence[AssignResult]] = None,
    ) -> Dict[str, torch.Tensor]:
        """All 3D losses.

        Args:
            all_cls_scores: (L, B, Q, C) logits of the Q matching queries (denoising queries split off).
            all_bbox_preds: (L, B, Q, 10) box codes (metric centres, log sizes, sin, cos, vx, vy).
            dn_mask_dict: the head's denoising bookkeeping (reference ``prepare_for_dn`` keys plus
                ``output_known_lbs_bboxes = (cls (L, B, pad, C), boxes (L, B, pad, 10))``), or None.
            gt_bboxes_3d: B tensors (n_b, 9), (x, y, z_gravity, x_size, y_size, z_size, yaw, vx, vy).
            gt_labels_3d: B tensors (n_b,) long.
            code_weights: (10,) weights of the L1 loss dims. match_costs: (10,) weights of the matching cost.
            assignments: the solution of :meth:`matching_problem` on these arguments (L * B results,
                layer-major), when the caller solved it together with other matchings; None: solve here.

        Returns:
            ``loss_cls``, ``loss_bbox`` (last layer), ``d{i}.loss_cls``, ``d{i}.loss_bbox`` (layers
            0..L-2) and, with denoising, ``dn_loss_cls``, ``dn_loss_bbox``, ``d{i}.dn_loss_cls``,
            ``d{i}.dn_loss_bbox``. When ``with_dn`` is on but ``dn_mask_dict`` is None (no denoising
            queries: eval-mode predictions or a batch without ground truth), the dn entries are detached
            copies of the matching losses, as in the reference.
        """
        device = all_cls_scores.device
        gt_bboxes_3d = [g.to(device) for g in gt_bboxes_3d]
        gt_labels_3d = [g.to(device) for g in gt_labels_3d]
        if assignments is None:
            by_layer = self.match(all_cls_scores, all_bbox_preds, gt_bboxes_3d, gt_labels_3d, match_costs)
        else:
            by_layer = _by_layer(assignments, all_cls_scores.size(1))
        layer_losses = [
            self._matching_loss(cls_scores, bbox_preds, layer_assignments, gt_bboxes_3d, code_weights)
            for cls_scores, bbox_preds, layer_assignments in zip(all_cls_scores, all_bbox_preds, by_layer)
        ]
        losses = _name_layer_losses(layer_losses, "")
        if dn_mask_dict is not None:
            losses.update(_name_layer_losses(self._denoising_losses(dn_mask_dict, code_weights), "dn_"))
        elif self.with_dn:
            detached = [(cls.detach(), bbox.detach()) for cls, bbox in layer_losses]
            losses.update(_name_layer_losses(detached, "dn_"))
        return losses

    def _matching_loss(
        self,
        cls_scores: torch.Tensor,
        bbox_preds: torch.Tensor,
        assignments: Sequence[AssignResult],
        gt_bboxes_3d: Sequence[torch.Tensor],
        code_weights: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Focal + L1 loss of one layer: ``cls_scores`` (B, Q, C), ``bbox_preds`` (B, Q, 10)."""
        batch_size, num_queries, num_classes = cls_scores.shape
        device = cls_scores.device
        # Targets are assembled on the host from the (CPU) assignment and uploaded without a device sync.
        labels = torch.stack(
            [torch.where(a.labels < 0, self.num_classes, a.labels) for a in assignments]
        )  # (B, Q)
        positive_rows = torch.cat([a.pos_inds + b * num_queries for b, a in enumerate(assignments)])  # (P,)
        num_pos = int(positive_rows.numel())

        cls_avg_factor = classification_normaliser(num_pos, cls_scores, over_ranks=self.sync_cls_avg_factor)
        loss_cls = self.loss_cls(
            cls_scores.reshape(-1, num_classes), upload(labels, device).reshape(-1), avg_factor=cls_avg_factor
        )

        bbox_targets = torch.cat(
            [gt[upload(a.pos_assigned_gt_inds, device)] for gt, a in zip(gt_bboxes_3d, assignments)]
        )  # (P, 9)
        flat_preds = bbox_preds.reshape(batch_size * num_queries, -1)  # (B * Q, 10)
        matched_preds = flat_preds[upload(positive_rows, device)]  # (P, 10)
        loss_bbox = self._masked_l1(
            matched_preds, normalize_bbox(bbox_targets), code_weights, mean_count_over_ranks(num_pos, device)
        )
        return torch.nan_to_num(loss_cls), torch.nan_to_num(loss_bbox)

    def _denoising_losses(
        self, dn_mask_dict: dict, code_weights: torch.Tensor
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Focal + L1 loss of the denoising queries of every layer.

        Reference ``prepare_for_loss`` + ``dn_loss_single``.
        """
        known_cls, known_coord = dn_mask_dict["output_known_lbs_bboxes"]  # (L, B, pad, C), (L, B, pad, 10)
        known_labels, known_bboxes = dn_mask_dict["known_lbs_bboxes"]  # (num_dn,), (num_dn, 9)
        device = known_cls.device
        known_indice = dn_mask_dict["known_indice"].long().to(device)  # (num_dn,) GT index of each copy
        batch_of_copy = dn_mask_dict["batch_idx"].long().to(device)[known_indice]  # (num_dn,)
        slot_of_copy = dn_mask_dict["map_known_indice"].long().to(device)  # (num_dn,) query row of each copy
        known_cls = known_cls[:, batch_of_copy, slot_of_copy]  # (L, num_dn, C), group-major copies
        known_coord = known_coord[:, batch_of_copy, slot_of_copy]  # (L, num_dn, 10)
        num_dn = known_indice.numel()

        expected_positives = num_dn * 3.14159 / 6 * self.split * self.split * self.split
        cls_avg_factor = classification_normaliser(
            expected_positives, known_cls, over_ranks=self.sync_cls_avg_factor
        )
        bbox_avg_factor = mean_count_over_ranks(num_dn, device)
        targets = normalize_bbox(known_bboxes.to(device))
        labels = known_labels.long().to(device)

        losses = []
        for cls_scores, bbox_preds in zip(known_cls, known_coord):
            loss_cls = self.loss_cls(cls_scores, labels, avg_factor=cls_avg_factor)
            loss_bbox = self._masked_l1(bbox_preds, targets, code_weights, bbox_avg_factor)
            losses.append(
                (self.dn_weight * torch.nan_to_num(loss_cls), self.dn_weight * torch.nan_to_num(loss_bbox))
            )
        return losses

    def _masked_l1(
        self,
        preds: torch.Tensor,
        targets: torch.Tensor,
        code_weights: torch.Tensor,
        avg_factor: float | torch.Tensor,
    ) -> torch.Tensor:
        """L1 over rows whose target code is finite (a zero-size box has log size -inf and is skipped).

        Masking with ``where`` instead of boolean indexing gives the reference's value without a host sync.
        """
        finite = torch.isfinite(targets).all(dim=-1, keepdim=True)  # (P, 1)
        preds = torch.where(finite, preds, torch.zeros_like(preds))
        targets = torch.where(finite, targets, torch.zeros_like(targets))
        return self.loss_bbox(preds, targets, code_weights * finite, avg_factor=avg_factor)


def _by_layer(flat: Sequence[AssignResult], batch_size: int) -> List[List[AssignResult]]:
    """Layer-major results of L * B samples -> ``result[l][b]``."""
    return [list(flat[start : start + batch_size]) for start in range(0, len(flat), batch_size)]


def _name_layer_losses(
    layer_losses: Sequence[Tuple[torch.Tensor, torch.Tensor]], prefix: str
) -> Dict[str, torch.Tensor]:
    """Reference key names: the last layer unprefixed, earlier layers ``d{i}.``."""
    named: Dict[str, torch.Tensor] = {}
    last_cls, last_bbox = layer_losses[-1]
    named[f"{prefix}loss_cls"] = last_cls
    named[f"{prefix}loss_bbox"] = last_bbox
    for index, (loss_cls, loss_bbox) in enumerate(layer_losses[:-1]):
        named[f"d{index}.{prefix}loss_cls"] = loss_cls
        named[f"d{index}.{prefix}loss_bbox"] = loss_bbox
    return named
