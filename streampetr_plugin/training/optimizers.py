"""Optimisers and their parameter groups (per-module learning-rate multipliers)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Literal, Mapping, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from streampetr_plugin.adapters.base import AdapterContext
    from streampetr_plugin.config.schema import Recipe
    from streampetr_plugin.plugins import Registries


def lr_multiplier(name: str, multipliers: Mapping[str, float]) -> float:
    """The multiplier of the longest key contained in ``name`` (mmcv's ``custom_keys`` rule), else 1."""
    for key in sorted(multipliers, key=len, reverse=True):
        if key in name:
            return multipliers[key]
    return 1.0


def build_param_groups(
    model: nn.Module, *, base_lr: float, multipliers: Mapping[str, float]
) -> List[Dict[str, object]]:
    """One group per distinct multiplier, each holding ``lr = base_lr * multiplier``.

    Grouping by multiplier (rather than one group per parameter as mmcv does) gives the same
    updates with a handful of groups, which fused and foreach optimisers handle much faster.
    Frozen parameters are left out: they receive no gradient.
    """
    groups: Dict[float, List[Tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(lr_multiplier(name, multipliers), []).append((name, param))
    return [
        {
            "params": [p for _, p in named],
            "param_names": [n for n, _ in named],
            "lr": base_lr * multiplier,
            "lr_mult": multiplier,
        }
        for multiplier, named in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module, recipe: "Recipe", context: "AdapterContext", registries: "Registries"
) -> torch.optim.Optimizer:
    """The recipe's optimiser (from ``registries``) over ``model``'s learning-rate groups, with what the
    OPTIMIZER adapters left in ``context`` (settings they override, a substitute optimiser class)."""
    spec = recipe.optimization.optimizer
    arguments = spec.arguments
    if isinstance(arguments, BaseModel):
        arguments = arguments.model_copy(update=context.optimizer_options)
        lr = getattr(arguments, "lr", None)
    else:
        arguments = {**arguments, **context.optimizer_options}
        lr = arguments.get("lr")
    if lr is None:
        raise ValueError(f"optimization.optimizer ({spec.type}) has no lr option")
    groups = build_param_groups(model, base_lr=lr, multipliers=recipe.optimization.lr_multipliers)
    extra = {} if context.optimizer_class is None else {"optimizer_class": context.optimizer_class}
    return registries.optimizers.build(spec.type, arguments, param_groups=groups, **extra)


class AdamWParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(4e-4, gt=0, description="Base learning rate (the reference's, for a global batch of 16).")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay, applied to every parameter.")
    betas: Tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    implementation: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto",
        description="'auto': the accelerator adapter picks (fused on CUDA/NPU, foreach on CPU); or force one.",
    )


def build_adamw(
    params: AdamWParams,
    *,
    param_groups: Iterable[Dict[str, object]],
    optimizer_class: type = torch.optim.AdamW,
) -> torch.optim.Optimizer:
    """AdamW with ``params``; ``optimizer_class`` lets an adapter substitute a fused kernel with the same
    API."""
    kwargs: Dict[str, object] = {
        "lr": params.lr, "weight_decay": params.weight_decay, "betas": tuple(params.betas), "eps": params.eps,
    }
    implementation = params.implementation
    if optimizer_class is torch.optim.AdamW and implementation in ("fused", "foreach"):
        kwargs[implementation] = True
    elif optimizer_class is torch.optim.AdamW and implementation == "loop":
        kwargs["foreach"] = False
    groups = [{k: v for k, v in group.items() if k != "param_names"} for group in param_groups]
    return optimizer_class(groups, **kwargs)
