"""Sigmoid focal loss on logits with integer labels (mmdet ``FocalLoss(use_sigmoid=True)``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from streampetr_plugin.models.losses.reduction import Reduction, weight_reduce_loss


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25
) -> torch.Tensor:
    """Element-wise focal loss ``-alpha_t (1 - p_t)^gamma log p_t``.

    Args:
        logits: (N, C). targets: (N, C) in {0, 1} (or soft).

    Returns:
        (N, C) unreduced loss.
    """
    prob = logits.sigmoid()
    targets = targets.type_as(logits)
    one_minus_pt = (1 - prob) * targets + prob * (1 - targets)
    focal_weight = (alpha * targets + (1 - alpha) * (1 - targets)) * one_minus_pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * focal_weight


class FocalLoss(nn.Module):
    """Sigmoid focal loss; label ``C`` (the number of logits) is background (an all-zero target row)."""

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        alpha: float = 0.25,
        loss_weight: float = 2.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        avg_factor: Optional[float | torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss of logits ``pred`` (N, C) against labels ``target`` (N,) in [0, C].

        ``weight`` is per sample (N,) or per element (N, C).
        """
        classes = torch.arange(pred.size(1), device=pred.device)
        # (N, C) one-hot rows, background (C) all zero; a comparison, where F.one_hot would read the
        # labels' range back to the host.
        one_hot = target.long()[:, None] == classes
        loss = sigmoid_focal_loss(pred, one_hot, gamma=self.gamma, alpha=self.alpha)
        if weight is not None and weight.dim() == 1:
            weight = weight.view(-1, 1)
        return self.loss_weight * weight_reduce_loss(loss, weight, self.reduction, avg_factor)
