"""Weighted L1 loss (mmdet ``L1Loss``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from streampetr_plugin.models.losses.reduction import Reduction, weight_reduce_loss


class L1Loss(nn.Module):
    """``|pred - target|`` with element weights."""

    def __init__(self, *, loss_weight: float = 1.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        avg_factor: Optional[float | torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss of ``pred`` against ``target`` (same shape); ``weight`` broadcastable to it.

        An empty target gives ``pred.sum() * 0`` (a zero connected to the graph).
        """
        if target.numel() == 0:
            return pred.sum() * 0
        loss = torch.abs(pred - target)
        return self.loss_weight * weight_reduce_loss(loss, weight, self.reduction, avg_factor)
