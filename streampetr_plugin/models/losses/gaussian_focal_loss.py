"""Gaussian focal loss against a Gaussian heatmap (CornerNet / CenterNet; mmdet ``GaussianFocalLoss``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from streampetr_plugin.models.losses.reduction import Reduction, weight_reduce_loss

_LOG_EPS = 1e-12


def gaussian_focal_loss(
    prob: torch.Tensor, heatmap: torch.Tensor, alpha: float = 2.0, gamma: float = 4.0
) -> torch.Tensor:
    """Element-wise loss of probabilities ``prob`` against ``heatmap`` (same shape, peaks exactly 1).

    Peaks (heatmap == 1) are positives; elsewhere the negative term is down-weighted by
    ``(1 - heatmap)^gamma``.
    """
    positive = heatmap.eq(1)
    negative_weight = (1 - heatmap).pow(gamma)
    positive_loss = -(prob + _LOG_EPS).log() * (1 - prob).pow(alpha) * positive
    negative_loss = -(1 - prob + _LOG_EPS).log() * prob.pow(alpha) * negative_weight
    return positive_loss + negative_loss


class GaussianFocalLoss(nn.Module):
    """Gaussian focal loss on probabilities (not logits)."""

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        gamma: float = 4.0,
        loss_weight: float = 1.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        avg_factor: Optional[float | torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss of ``pred`` (any shape, probabilities) against the heatmap ``target`` (same shape)."""
        loss = gaussian_focal_loss(pred, target, alpha=self.alpha, gamma=self.gamma)
        return self.loss_weight * weight_reduce_loss(loss, weight, self.reduction, avg_factor)
