"""What the loop does with a batch and with the losses the detector returns for it."""
from __future__ import annotations

from typing import Any, Mapping

import torch


def move_to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists and tuples) moved to ``device``; other values unchanged.

    Dtypes are kept: the float64 timestamps of the batch contract stay float64.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: move_to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to_device(item, device) for item in value)
    return value


def total_loss(losses: Mapping[str, Any]) -> torch.Tensor:
    """The reference's total (mmdet's ``_parse_losses``): the plain sum of every entry whose name
    contains ``"loss"``; an entry may be a tensor or a list of tensors."""
    terms = []
    for name, value in losses.items():
        if "loss" in name:
            terms.extend(value if isinstance(value, (list, tuple)) else [value])
    if not terms:
        raise ValueError(f"the model returned no loss entries (keys: {sorted(losses)})")
    return torch.stack([term.float().reshape(()) for term in terms]).sum()
