"""One training iteration, as the reference's ``Fp16OptimizerHook`` runs it; the trainer and the benchmark
both step through :class:`TrainStep`.

Zero grads, forward under autocast, total = the plain sum of every entry whose name contains ``"loss"``
(:func:`total_loss`), (scaled) backward, unscale, the gradient norm (clipped when the recipe says so),
the rank means of every loss term, the total and the norm read back to the host in one read, the
optimiser step unless the loss or the gradients are not finite, the loss-scale update. The rank mean is
one small all-reduce per iteration, which also makes every rank take the same skip decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from streampetr_plugin.config.schema import GradClipConfig
from streampetr_plugin.training import distributed
from streampetr_plugin.training.precision import MixedPrecision


def total_loss(losses: Mapping[str, Any]) -> torch.Tensor:
    """The reference's total (mmdet's ``_parse_losses``): the fp32 sum of every entry whose name contains
    ``"loss"``; an entry may be a tensor or a list of tensors."""
    terms = []
    for name, value in losses.items():
        if "loss" in name:
            terms.extend(value if isinstance(value, (list, tuple)) else [value])
    if not terms:
        raise ValueError(f"the model returned no loss entries (keys: {sorted(losses)})")
    return torch.stack([term.float().reshape(()) for term in terms]).sum()


@dataclass
class StepResult:
    """What one iteration reports, on the host: ``terms`` (rank means of every scalar entry the model
    returned, and ``loss``, their total), ``grad_norm`` and whether the optimiser step was ``skipped``."""

    terms: Dict[str, float]
    grad_norm: float
    skipped: bool


class TrainStep:
    """One iteration on a batch already on the device (see the module docstring).

    Args:
        model: what the batch goes through (the DDP wrapper when there is one); returns
            :class:`~streampetr_plugin.models.outputs.TrainingOutputs`.
        optimizer: the optimiser of the unwrapped model's parameters.
        precision: autocast and loss scaling.
        grad_clip: the recipe's ``optimization.grad_clip`` (None: the norm is measured, not clipped).
        world_size: processes whose loss terms are averaged.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: MixedPrecision,
        grad_clip: Optional[GradClipConfig],
        world_size: int = 1,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.grad_clip = grad_clip
        self.world_size = world_size

    def _trainable_parameters(self) -> List[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]

    def _gradient_norm(self, like: torch.Tensor) -> torch.Tensor:
        """The total gradient norm (clipping the gradients when the recipe says so), on the device."""
        parameters = self._trainable_parameters()
        clip = self.grad_clip
        if clip is not None:
            return torch.nn.utils.clip_grad_norm_(parameters, clip.max_norm, norm_type=clip.norm_type)
        if parameters:
            norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])
            return torch.linalg.vector_norm(norms)
        return like.new_zeros(())

    def __call__(self, batch: Mapping[str, Any]) -> StepResult:
        optimizer, precision = self.optimizer, self.precision
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            losses = self.model(batch).losses
        loss = total_loss(losses)
        names = [name for name, value in losses.items() if torch.is_tensor(value) and value.numel() == 1]
        scaler = precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = self._gradient_norm(loss)
        # Rank means of every term and the total; a NaN anywhere shows on every rank.
        values = torch.stack([losses[name].detach().float().reshape(()) for name in names] + [loss.detach()])
        values = distributed.all_reduce_sum(values) / self.world_size
        # One read for every term, the total and the gradient norm (equal on every rank already).
        *host, norm = torch.cat([values, grad_norm.detach().float().reshape(1)]).tolist()
        terms = dict(zip(names, host[:-1]))
        terms["loss"] = host[-1]
        loss_finite = math.isfinite(host[-1])
        step_taken = loss_finite and math.isfinite(norm)
        if scaler is not None:
            if loss_finite:
                scaler.step(optimizer)  # skips by itself when the gradients overflowed
            precision.update()
        elif step_taken:
            optimizer.step()
        return StepResult(terms=terms, grad_norm=norm, skipped=not step_taken)

