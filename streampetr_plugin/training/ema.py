"""An exponential moving average (EMA) of the weights: what a run evaluates and saves for use.

After every optimiser step that was taken, each trained parameter's average moves towards it:
``average += (1 - d) * (parameter - average)``, with ``d = min(decay, (1 + n) / (10 + n))`` after ``n``
updates. The ramp keeps the first average from being dominated by the starting weights (it is the
weights themselves after the first update); on a long run ``d`` settles at ``decay``. Buffers
(BatchNorm statistics) and frozen parameters are not averaged: the evaluated model takes them from the
trained one, as mmengine's ``EMAHook`` does by default.

Why: the last weights of a short or noisy run depend on the last few batches; their average over the
final few hundred steps is a steadier model (Polyak averaging), so the evaluation varies less from one
seed or machine to another. The trained weights still carry the run: the optimiser steps them, and a
resumed run continues from them and from the saved average.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn


def _trained_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every floating-point parameter the optimiser steps (shared ones once)."""
    return [(name, parameter) for name, parameter in model.named_parameters()
            if parameter.requires_grad and parameter.is_floating_point()]


class WeightEMA:
    """The moving average of a model's trained parameters (see the module docstring).

    Args:
        decay: the long-run decay ``d`` (``optimization.ema.decay``).
    """

    def __init__(self, *, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self._averages: Optional[Dict[str, torch.Tensor]] = None  # parameter name -> average; None before the first update

    def rate(self) -> float:
        """The decay ``d`` of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the averages towards ``model``'s current parameters (call after each optimiser step)."""
        named = _trained_parameters(model)
        if self._averages is None:
            self._averages = {name: parameter.detach().clone() for name, parameter in named}
        else:
            averages = [self._averages[name] for name, _ in named]
            # One fused call over all tensors: a per-tensor loop launches a kernel per parameter on a GPU.
            torch._foreach_lerp_(averages, [parameter.detach() for _, parameter in named], 1.0 - self.rate())
        self.updates += 1

    def averaged_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """``model.state_dict()`` with every averaged parameter replaced by its average (also under the
        extra names of a shared parameter); buffers and frozen parameters as the model holds them."""
        state = model.state_dict()
        if self._averages is None:
            return state
        by_parameter = {id(parameter): self._averages[name] for name, parameter in _trained_parameters(model)}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if id(parameter) in by_parameter:
                state[name] = by_parameter[id(parameter)]
        return state

    def load(self, averaged: Dict[str, torch.Tensor], *, updates: int, model: nn.Module) -> None:
        """Restore the averages from a checkpoint's averaged state dict (as written by
        :meth:`averaged_state_dict`) after ``updates`` updates."""
        self._averages = {
            name: averaged[name].to(device=parameter.device, dtype=parameter.dtype).clone()
            for name, parameter in _trained_parameters(model)
        }
        self.updates = updates

    def state(self) -> Dict[str, float]:
        """What a checkpoint records besides the averages."""
        return {"decay": self.decay, "updates": self.updates}

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``model``'s trained parameters hold their averages (for evaluation); the
        trained values are back afterwards, also after an error."""
        if self._averages is None:
            yield
            return
        named = _trained_parameters(model)
        with torch.no_grad():
            trained = [parameter.detach().clone() for _, parameter in named]
            for name, parameter in named:
                parameter.copy_(self._averages[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, parameter), value in zip(named, trained):
                    parameter.copy_(value)
