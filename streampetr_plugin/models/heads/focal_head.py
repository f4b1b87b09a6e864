"""The 2D auxiliary head (reference ``FocalHead``): per-token 2D detection on the image features.

In training it adds 2D losses that shape the shared backbone / neck, and ranks the image tokens
(``topk_indexes``) that the 3D head gathers; with ``train_ratio = 1.0`` that ranking is a pure permutation
of all tokens. At test time the detector does not run it.

Module names equal the reference's so the state dict keys are ``img_roi_head.{cls, shared_reg, shared_cls,
centerness, ltrb, center2d}.*``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from streampetr_plugin.models.assigners.assign_result import AssignResult
from streampetr_plugin.models.assigners.hungarian_2d import HungarianAssigner2D
from streampetr_plugin.models.assigners.solver import MatchingProblem, solve_matchings
from streampetr_plugin.models.box_ops import bbox_cxcywh_to_xyxy, bbox_overlaps, bbox_xyxy_to_cxcywh
from streampetr_plugin.models.layers.functional import (
    bias_init_with_prob,
    classification_normaliser,
    clip_sigmoid,
    device_constant,
    inverse_sigmoid,
    mean_count_over_ranks,
    upload,
)
from streampetr_plugin.models.losses.gaussian_focal_loss import GaussianFocalLoss
from streampetr_plugin.models.losses.giou_loss import GIoULoss
from streampetr_plugin.models.losses.l1_loss import L1Loss
from streampetr_plugin.models.losses.quality_focal_loss import QualityFocalLoss


class FocalHeadParams(BaseModel):
    """User-settable options of :class:`FocalHead` (defaults: the V2-99 recipe)."""

    model_config = ConfigDict(extra="forbid")

    embed_dims: int = Field(default=256, gt=0, description="Channels of the shared 3x3 conv branches.")
    train_ratio: float = Field(default=1.0, gt=0, le=1, description="Fraction of tokens ranked in training.")
    infer_ratio: float = Field(default=1.0, gt=0, le=1, description="Fraction of tokens ranked at inference.")
    use_hybrid_tokens: bool = Field(
        default=False, description="Draw the training ratio uniformly from [0.2, 1.0) each step instead."
    )
    sync_cls_avg_factor: bool = Field(default=False, description="All-reduce the classification normaliser.")
    loss_cls_weight: float = Field(default=2.0, ge=0, description="Weight of the quality focal loss.")
    loss_cls_beta: float = Field(default=2.0, ge=0, description="Beta of the quality focal loss.")
    loss_bbox_weight: float = Field(default=5.0, ge=0, description="Weight of the L1 loss (cxcywh).")
    loss_iou_weight: float = Field(default=2.0, ge=0, description="Weight of the GIoU loss on pixel boxes.")
    loss_centers2d_weight: float = Field(default=10.0, ge=0, description="Weight of the L1 loss on centres.")
    loss_centerness_weight: float = Field(default=1.0, ge=0, description="Weight of the Gaussian focal loss.")
    assigner_cls_weight: float = Field(default=2.0, ge=0, description="Focal cost weight of the 2D matching.")
    assigner_reg_weight: float = Field(default=5.0, ge=0, description="L1 (cxcywh) cost weight, 2D matching.")
    assigner_iou_weight: float = Field(default=2.0, ge=0, description="GIoU cost weight of the 2D matching.")
    assigner_centers2d_weight: float = Field(default=10.0, ge=0, description="Centre L1 cost weight.")


def _conv3x3_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(32, num_channels=out_channels),
        nn.ReLU(),
    )


class FocalHead(nn.Module):
    """Per-token classification, centerness, box (ltrb) and projected-centre regression.

    Args:
        params: the user settings.
        in_channels: channels of the neck level fed to the head.
        num_classes: number of object classes.
        stride: input pixels per cell of that neck level.
    """

    def __init__(
        self,
        params: FocalHeadParams,
        *,
        in_channels: int,
        num_classes: int,
        stride: int,
    ) -> None:
        super().__init__()
        embed_dims = params.embed_dims
        self.num_classes = num_classes
        self.stride = stride
        self.train_ratio = params.train_ratio
        self.infer_ratio = params.infer_ratio
        self.use_hybrid_tokens = params.use_hybrid_tokens
        self.sync_cls_avg_factor = params.sync_cls_avg_factor

        self.cls = nn.Conv2d(embed_dims, num_classes, kernel_size=1)
        self.shared_reg = _conv3x3_gn_relu(in_channels, embed_dims)
        self.shared_cls = _conv3x3_gn_relu(in_channels, embed_dims)
        self.centerness = nn.Conv2d(embed_dims, 1, kernel_size=1)
        self.ltrb = nn.Conv2d(embed_dims, 4, kernel_size=1)
        self.center2d = nn.Conv2d(embed_dims, 2, kernel_size=1)
        prior_bias = bias_init_with_prob(0.01)
        nn.init.constant_(self.cls.bias, prior_bias)
        nn.init.constant_(self.centerness.bias, prior_bias)

        self.assigner = HungarianAssigner2D(
            cls_weight=params.assigner_cls_weight,
            reg_weight=params.assigner_reg_weight,
            iou_weight=params.assigner_iou_weight,
            centers2d_weight=params.assigner_centers2d_weight,
        )
        self.loss_cls2d = QualityFocalLoss(beta=params.loss_cls_beta, loss_weight=params.loss_cls_weight)
        self.loss_bbox2d = L1Loss(loss_weight=params.loss_bbox_weight)
        self.loss_iou2d = GIoULoss(loss_weight=params.loss_iou_weight)
        self.loss_centers2d = L1Loss(loss_weight=params.loss_centers2d_weight)
        self.loss_centerness = GaussianFocalLoss(loss_weight=params.loss_centerness_weight)

    def forward(self, location: torch.Tensor, img_feats: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Predict per token of every camera.

        Args:
            location: (B*N, H, W, 2) normalised token centres ``((16 j + 8) / pad_w, (16 i + 8) / pad_h)``.
            img_feats: (B, N, C, H, W) neck features.

        Returns:
            ``enc_cls_scores`` (B*N, H*W, num_classes) logits; ``enc_bbox_preds`` (B*N, H*W, 4) normalised
            (cx, cy, w, h); ``pred_centers2d`` (B*N, H*W, 2) normalised; ``centerness`` (B*N, H*W, 1) logits;
            ``topk_indexes`` (B, K, 1) token indices over all N*H*W tokens of a sample, by descending
            ``max_c sigmoid(cls) * sigmoid(centerness)``, K = int(N*H*W * ratio). Tokens are row-major per
            camera, cameras in order.
        """
        batch_size, num_cams, _, height, width = img_feats.shape
        num_images = batch_size * num_cams
        features = img_feats.flatten(0, 1)  # (B*N, C, H, W)

        cls_feat = self.shared_cls(features)
        cls_logits = self.cls(cls_feat).permute(0, 2, 3, 1).reshape(num_images, -1, self.num_classes)
        centerness = self.centerness(cls_feat).permute(0, 2, 3, 1).reshape(num_images, -1, 1)

        reg_feat = self.shared_reg(features)
        ltrb = self.ltrb(reg_feat).permute(0, 2, 3, 1).sigmoid()  # (B*N, H, W, 4)
        centre_offset = self.center2d(reg_feat).permute(0, 2, 3, 1)  # (B*N, H, W, 2)
        pred_centers2d = (inverse_sigmoid(location) + centre_offset).sigmoid().reshape(num_images, -1, 2)
        corners = torch.cat([location - ltrb[..., :2], location + ltrb[..., 2:]], dim=-1).clamp(min=0, max=1)
        pred_bboxes = bbox_xyxy_to_cxcywh(corners).reshape(num_images, -1, 4)

        num_tokens = num_cams * height * width
        num_sample_tokens = int(num_tokens * self._sample_ratio())
        max_class_logit = cls_logits.detach().amax(dim=2).reshape(batch_size, -1, 1)  # (B, N*H*W, 1)
        sample_weight = max_class_logit.sigmoid() * centerness.detach().reshape(batch_size, -1, 1).sigmoid()
        _, topk_indexes = torch.topk(sample_weight, num_sample_tokens, dim=1)
        return {
            "enc_cls_scores": cls_logits,
            "enc_bbox_preds": pred_bboxes,
            "pred_centers2d": pred_centers2d,
            "centerness": centerness,
            "topk_indexes": topk_indexes,
        }

    def _sample_ratio(self) -> float:
        if not self.training:
            return self.infer_ratio
        if self.use_hybrid_tokens:
            return 0.2 + 0.8 * torch.rand(()).item()
        return self.train_ratio

    def matching_problem(
        self,
        preds: Dict[str, torch.Tensor],
        gt_bboxes_2d: Sequence[Sequence[torch.Tensor]],
        gt_labels_2d: Sequence[Sequence[torch.Tensor]],
        centers_2d: Sequence[Sequence[torch.Tensor]],
        pad_hw: Tuple[int, int],
    ) -> MatchingProblem:
        """The costs of matching the tokens of all B*N images (the arguments of :meth:`loss`), on the
        device; :meth:`loss` takes its solution."""
        gt_boxes, gt_labels, gt_centres = _per_image(preds, gt_bboxes_2d, gt_labels_2d, centers_2d)
        return self.assigner.problem(
            preds["enc_cls_scores"], preds["enc_bbox_preds"], preds["pred_centers2d"],
            gt_boxes, gt_labels, gt_centres, pad_hw,
        )

    def loss(
        self,
        preds: Dict[str, torch.Tensor],
        gt_bboxes_2d: Sequence[Sequence[torch.Tensor]],
        gt_labels_2d: Sequence[Sequence[torch.Tensor]],
        centers_2d: Sequence[Sequence[torch.Tensor]],
        pad_hw: Tuple[int, int],
        assignments: Optional[Sequence[AssignResult]] = None,
    ) -> Dict[str, torch.Tensor]:
        """2D losses over all B*N images (the reference's ``FocalHead.loss`` / ``loss_single``).

        Args:
            preds: the output of :meth:`forward` (``topk_indexes`` unused).
            gt_bboxes_2d: [B][N] tensors (m, 4) xyxy pixels of the padded input.
            gt_labels_2d: [B][N] tensors (m,) 2D class indices.
            centers_2d: [B][N] tensors (m, 2) projected 3D centres in pixels.
            pad_hw: (H, W) of the padded input.
            assignments: the solution of :meth:`matching_problem` on these arguments (one per image),
                when the caller solved it together with other matchings; None: solve here.

        Returns:
            ``enc_loss_cls`` (QFL), ``enc_loss_bbox`` (L1 on normalised cxcywh), ``enc_loss_iou`` (GIoU in
            pixels), ``centers2d_losses`` (L1 on normalised centres), ``centerness_losses`` (Gaussian focal).
        """
        cls_scores = preds["enc_cls_scores"]  # (I, T, C), I = B*N images
        bbox_preds = preds["enc_bbox_preds"]  # (I, T, 4)
        num_images, num_tokens, num_classes = cls_scores.shape
        device = cls_scores.device
        gt_boxes, gt_labels, gt_centres = _per_image(preds, gt_bboxes_2d, gt_labels_2d, centers_2d)
        if assignments is None:
            problem = self.matching_problem(preds, gt_bboxes_2d, gt_labels_2d, centers_2d, pad_hw)
            assignments = solve_matchings([problem])[0]
        labels, bbox_targets, bbox_weights, centers2d_targets = self._targets(
            assignments, gt_boxes, gt_centres, num_tokens, pad_hw, bbox_preds
        )
        num_pos = sum(int(a.pos_inds.numel()) for a in assignments)

        pad_h, pad_w = pad_hw
        factor = device_constant([pad_w, pad_h, pad_w, pad_h], bbox_preds)
        bbox_preds = bbox_preds.reshape(-1, 4)
        pred_pixels = bbox_cxcywh_to_xyxy(bbox_preds) * factor
        target_pixels = bbox_cxcywh_to_xyxy(bbox_targets) * factor
        # The GIoU and classification normalisers are this rank's matched count (reference order).
        loss_iou = self.loss_iou2d(pred_pixels, target_pixels, bbox_weights, avg_factor=num_pos)
        iou_score = bbox_overlaps(target_pixels, pred_pixels, is_aligned=True).reshape(-1)

        cls_avg_factor = classification_normaliser(num_pos, cls_scores, over_ranks=self.sync_cls_avg_factor)
        loss_cls = self.loss_cls2d(
            cls_scores.reshape(-1, num_classes), (labels, iou_score.detach()), avg_factor=cls_avg_factor
        )

        mean_num_pos = mean_count_over_ranks(num_pos, device)
        heatmaps = self._heatmaps(gt_centres, gt_boxes, pad_hw, device)  # (I, H / s * W / s)
        loss_centerness = self.loss_centerness(
            clip_sigmoid(preds["centerness"]), heatmaps.reshape(num_images, -1, 1), avg_factor=mean_num_pos
        )
        loss_bbox = self.loss_bbox2d(bbox_preds, bbox_targets, bbox_weights, avg_factor=mean_num_pos)
        loss_centers2d = self.loss_centers2d(
            preds["pred_centers2d"].reshape(-1, 2), centers2d_targets, bbox_weights[:, :2],
            avg_factor=mean_num_pos,
        )
        return {
            "enc_loss_cls": loss_cls,
            "enc_loss_bbox": loss_bbox,
            "enc_loss_iou": loss_iou,
            "centers2d_losses": loss_centers2d,
            "centerness_losses": loss_centerness,
        }

    def _targets(
        self,
        assignments: Sequence[AssignResult],
        gt_boxes: Sequence[torch.Tensor],
        gt_centres: Sequence[torch.Tensor],
        num_tokens: int,
        pad_hw: Tuple[int, int],
        like: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened (I*T) targets: labels (background = num_classes), normalised cxcywh boxes, box weights
        (1 at matched tokens), normalised centres."""
        device = like.device
        pad_h, pad_w = pad_hw
        factor = device_constant([pad_w, pad_h, pad_w, pad_h], like)
        labels = torch.cat([torch.where(a.labels < 0, self.num_classes, a.labels) for a in assignments])
        labels = upload(labels, device)
        rows = torch.cat([a.pos_inds + n * num_tokens for n, a in enumerate(assignments)])  # (P,)
        rows = upload(rows, device)
        matched_boxes = torch.cat(
            [boxes[upload(a.pos_assigned_gt_inds, device)] for boxes, a in zip(gt_boxes, assignments)]
        ).to(like.dtype)  # (P, 4) pixels
        matched_centres = torch.cat(
            [centres[upload(a.pos_assigned_gt_inds, device)] for centres, a in zip(gt_centres, assignments)]
        ).to(like.dtype)  # (P, 2) pixels

        total = len(assignments) * num_tokens
        matched_targets = bbox_xyxy_to_cxcywh(matched_boxes / factor)  # (P, 4) normalised
        bbox_targets = like.new_zeros(total, 4).index_copy(0, rows, matched_targets)
        bbox_weights = like.new_zeros(total, 4).index_fill(0, rows, 1.0)
        centers2d_targets = like.new_zeros(total, 2).index_copy(0, rows, matched_centres / factor[:2])
        return labels, bbox_targets, bbox_weights, centers2d_targets

    def _heatmaps(
        self,
        gt_centres: Sequence[torch.Tensor],
        gt_boxes: Sequence[torch.Tensor],
        pad_hw: Tuple[int, int],
        device: torch.device,
    ) -> torch.Tensor:
        """Per image a (H / s, W / s) map: max over its objects of a Gaussian peaking at 1 at the centre.

        Radius ``r = max(ceil(min(l, t, r, b) / s), 1)`` cells from the centre's pixel distances to the box
        sides, sigma ``(2 r + 1) / 6``, support the (2 r + 1)^2 window clipped to the map; the centre cell is
        ``trunc(centre / s)``. (The reference hard-codes s = 16, the stride of every recipe.)

        Returns:
            (I, H / s * W / s) float32, row-major.
        """
        pad_h, pad_w = pad_hw
        map_h, map_w = pad_h // self.stride, pad_w // self.stride
        num_images = len(gt_centres)
        if max((c.size(0) for c in gt_centres), default=0) == 0:
            return torch.zeros(num_images, map_h * map_w, device=device)
        centres = pad_sequence([c.float() for c in gt_centres], batch_first=True)  # (I, G, 2)
        boxes = pad_sequence([b.float() for b in gt_boxes], batch_first=True)  # (I, G, 4)
        valid = pad_sequence(
            [torch.ones(c.size(0), dtype=torch.bool, device=device) for c in gt_centres], batch_first=True
        )  # (I, G)

        distances = torch.cat([centres - boxes[..., :2], boxes[..., 2:] - centres], dim=-1)  # (I, G, 4) ltrb
        radius = torch.ceil(distances.amin(dim=-1) / self.stride).clamp(min=1.0).long()  # (I, G)
        centre_cell = (centres / self.stride).long()  # (I, G, 2) truncated towards zero
        sigma = (2 * radius + 1).float() / 6

        cols = torch.arange(map_w, device=device)
        rows = torch.arange(map_h, device=device)
        dx = cols.view(1, 1, 1, -1) - centre_cell[..., 0, None, None]  # (I, G, 1, W')
        dy = rows.view(1, 1, -1, 1) - centre_cell[..., 1, None, None]  # (I, G, H', 1)
        # float32 (the reference's numpy float64 differs by an ulp at most); exactly 1 at the centre cell.
        squared = (dx * dx + dy * dy).float()
        gaussian = torch.exp(-squared / (2 * sigma * sigma)[..., None, None])  # (I, G, H', W')
        window = (dx.abs() <= radius[..., None, None]) & (dy.abs() <= radius[..., None, None])
        gaussian = torch.where(window & valid[..., None, None], gaussian, torch.zeros_like(gaussian))
        return gaussian.amax(dim=1).reshape(num_images, -1)


def _per_image(
    preds: Dict[str, torch.Tensor],
    gt_bboxes_2d: Sequence[Sequence[torch.Tensor]],
    gt_labels_2d: Sequence[Sequence[torch.Tensor]],
    centers_2d: Sequence[Sequence[torch.Tensor]],
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """The [B][N] ground truths as B*N per-image lists (boxes, labels, centres) on the predictions' device."""
    device = preds["enc_cls_scores"].device
    return (
        [boxes.to(device) for per_sample in gt_bboxes_2d for boxes in per_sample],
        [labels.to(device) for per_sample in gt_labels_2d for labels in per_sample],
        [centres.to(device) for per_sample in centers_2d for centres in per_sample],
    )
