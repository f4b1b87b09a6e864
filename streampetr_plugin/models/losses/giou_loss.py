"""Generalised IoU loss on xyxy boxes (mmdet ``GIoULoss``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from streampetr_plugin.models.box_ops import bbox_overlaps
from streampetr_plugin.models.losses.reduction import Reduction, weight_reduce_loss


class GIoULoss(nn.Module):
    """``1 - GIoU`` of aligned box pairs."""

    def __init__(self, *, eps: float = 1e-6, loss_weight: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.eps = eps
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        avg_factor: Optional[float | torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss of ``pred`` (N, 4) against ``target`` (N, 4), both xyxy.

        ``weight`` is (N,) or (N, 4); a (N, 4) weight is averaged over its last dim. When no weight is
        positive the result is an exact zero that still depends on ``pred`` (so the graph stays connected).
        """
        mean_weight = weight.mean(-1) if weight is not None and weight.dim() > 1 else weight
        loss = 1 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=self.eps)
        reduced = self.loss_weight * weight_reduce_loss(loss, mean_weight, self.reduction, avg_factor)
        if weight is None:
            return reduced
        # mmdet returns (pred * weight).sum() when no weight is positive; chosen on the device, so the
        # host never waits for the answer.
        connected_zero = (pred * (weight.unsqueeze(1) if pred.dim() == weight.dim() + 1 else weight)).sum()
        return torch.where(torch.any(weight > 0), reduced, connected_zero)
