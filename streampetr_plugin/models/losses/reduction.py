"""Element-weighting and reduction shared by every loss (mmdet 2.28 ``weight_reduce_loss``)."""
from __future__ import annotations

from typing import Literal, Optional

import torch

Reduction = Literal["none", "mean", "sum"]

# mmdet 2.28 adds float32 machine epsilon to ``avg_factor`` so that a zero factor cannot divide by zero.
AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


def weight_reduce_loss(
    loss: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    reduction: Reduction = "mean",
    avg_factor: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """Multiply ``loss`` by ``weight`` (broadcast) and reduce.

    With ``avg_factor`` and ``reduction="mean"`` the result is ``sum / (avg_factor + eps)`` instead of the
    element mean; ``avg_factor`` with ``"sum"`` is an error, as in mmdet.
    """
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss
    if reduction == "mean":
        return loss.sum() / (avg_factor + AVG_FACTOR_EPS)
    if reduction == "sum":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss
