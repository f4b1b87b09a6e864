"""SIMULATION of ``mindspeed_mm/fsdp/optimizer/optimizer.py`` (#8).

Built from the *wrapped* model (DDP names carry ``module.``). Without ``lr_scaling_plan``: one group
with every trainable parameter at ``weight_decay`` (norms and biases included). With it: groups by
``lr = base_lr * scale`` of the first plan entry whose regex ``re.match``es the name. ``adamw`` is
``torch.optim.AdamW(fused=adam_fused, foreach=not adam_fused)``; other types raise ``ValueError``.
"""

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


def _groups_by_scale(model: nn.Module, base_lr: float, weight_decay: float, plan: Sequence) -> List[Dict]:
    groups: Dict[float, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = next((entry.scale for entry in plan if re.match(entry.match, name)), 1.0)
        lr = base_lr * scale
        groups.setdefault(lr, {"params": [], "lr": lr, "weight_decay": weight_decay})["params"].append(param)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: Tuple[float, float],
    eps: float,
    weight_decay: float,
    fused: bool,
    optimizer_type: str,
    lr_scaling_plan: Optional[Sequence] = None,
) -> torch.optim.Optimizer:
    if lr_scaling_plan:
        groups = _groups_by_scale(model, lr, weight_decay, lr_scaling_plan)
    else:
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}
        ]
    if optimizer_type != "adamw":
        raise ValueError("Only adamw, adamw_swap and muon are supported as optimizers.")
    return torch.optim.AdamW(groups, lr, betas, eps, weight_decay, fused=fused, foreach=not fused)
