"""Batches on their way to the device."""
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

