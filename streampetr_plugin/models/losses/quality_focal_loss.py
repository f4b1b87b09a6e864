"""Quality focal loss (Generalized Focal Loss; mmdet ``QualityFocalLoss(use_sigmoid=True)``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from streampetr_plugin.models.losses.reduction import Reduction, weight_reduce_loss


def quality_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """Per-sample QFL.

    Every logit is pushed towards 0 with BCE weighted by ``sigmoid^beta``; at a positive sample's own class
    the BCE target is its quality ``score`` and the weight ``|score - sigmoid|^beta``.

    Args:
        logits: (N, C). labels: (N,) in [0, C], C = background. scores: (N,) quality targets in [0, 1].

    Returns:
        (N,) loss summed over classes.
    """
    prob = logits.sigmoid()
    classes = torch.arange(logits.size(1), device=logits.device)
    # (N, C): a sample's own class; background (C) and negative labels match no column. Computed densely
    # (no indexing by the positives), so the host never waits for their number.
    positive = labels.long()[:, None] == classes
    positive_scores = scores.type_as(logits)[:, None]  # (N, 1)
    targets = torch.where(positive, positive_scores, torch.zeros_like(logits))
    weight = torch.where(positive, (positive_scores - prob).abs().pow(beta), prob.pow(beta))
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight
    return loss.sum(dim=1)


class QualityFocalLoss(nn.Module):
    """QFL with targets ``(labels (N,), quality scores (N,))``."""

    def __init__(self, *, beta: float = 2.0, loss_weight: float = 2.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.beta = beta
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(
        self,
        pred: torch.Tensor,
        target: Tuple[torch.Tensor, torch.Tensor],
        weight: Optional[torch.Tensor] = None,
        avg_factor: Optional[float | torch.Tensor] = None,
    ) -> torch.Tensor:
        """Loss of logits ``pred`` (N, C); ``target = (labels (N,), scores (N,))``; ``weight`` (N,)."""
        labels, scores = target
        loss = quality_focal_loss(pred, labels, scores, beta=self.beta)
        return self.loss_weight * weight_reduce_loss(loss, weight, self.reduction, avg_factor)
