"""Iteration-based learning-rate schedules: ``factor(iteration)`` multiplies each group's base lr."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class CosineWarmupParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    warmup_iters: int = Field(500, ge=0, description="Linear warmup length in iterations.")
    warmup_ratio: float = Field(1.0 / 3.0, gt=0, le=1, description="Warmup starts at this fraction of the cosine value.")
    min_lr_ratio: float = Field(1e-3, ge=0, lt=1, description="Cosine end point as a fraction of the base lr.")


@dataclass(frozen=True)
class CosineWarmup:
    """mmcv's ``CosineAnnealing`` with linear warmup, per iteration (the reference's schedule).

    ``lr(i) = base * c(i)`` with ``c(i) = m + (1 - m)(1 + cos(pi i / max_iters)) / 2``; during
    warmup the cosine value is scaled by ``1 - (1 - i / warmup_iters)(1 - warmup_ratio)``. The settings
    and their defaults are :class:`CosineWarmupParams`; ``max_iters`` comes from the run's length.
    """

    max_iters: int
    warmup_iters: int
    warmup_ratio: float
    min_lr_ratio: float

    def __call__(self, iteration: int) -> float:
        progress = min(iteration, self.max_iters) / self.max_iters
        factor = self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if iteration < self.warmup_iters:
            factor *= 1.0 - (1.0 - iteration / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor

