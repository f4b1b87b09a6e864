"""The stop for a run whose steps keep being skipped for a non-finite loss or gradient."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

from torch import nn

from streampetr_plugin.errors import describe
from streampetr_plugin.training.checkpointing import NonFiniteLossError, nonfinite_entries
from streampetr_plugin.training.step import StepResult

logger = logging.getLogger(__name__)


class NonFiniteStreak:
    """Counts the steps skipped in a row; ``limit`` of them (``runtime.max_nonfinite_steps``) raise
    :class:`NonFiniteLossError`, naming the non-finite terms and weights and the last good checkpoint."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def update(
        self, result: StepResult, *, iteration: int, model: nn.Module, last_checkpoint: Optional[Path]
    ) -> None:
        self.count = self.count + 1 if result.skipped else 0
        if self.count == 0:
            return
        terms = {**result.terms, "grad_norm": result.grad_norm}
        logger.warning(
            "iteration %d: non-finite loss or gradient (loss %s, grad_norm %s), step skipped "
            "(%d in a row, limit %d)", iteration, terms["loss"], result.grad_norm, self.count, self.limit,
        )
        if self.count < self.limit:
            return
        bad = sorted(name for name, value in terms.items() if not math.isfinite(value))
        weights = nonfinite_entries(dict(model.named_parameters()))
        raise NonFiniteLossError(describe(
            f"iteration {iteration}",
            f"the loss or the gradients were not finite in {self.count} consecutive "
            f"iterations (runtime.max_nonfinite_steps={self.limit}; non-finite: {', '.join(bad)}"
            + (f"; {len(weights)} weight tensors are not finite, e.g. {weights[0]}" if weights else "")
            + f"); last good checkpoint: {last_checkpoint or 'none'}",
            "check the data (degenerate boxes, NaN inputs), lower the learning rate, or train "
            "without fp16 (optimization.amp.enabled=false); runtime.resume=auto continues from the "
            "last good checkpoint",
        ))
