"""SIMULATION of ``mindspeed_mm/fsdp/utils/utils.py`` and MindSpeed helpers used by the trainer.

#13 ``move_to_device``: builds a NEW dict; floating tensors (float64 included) and all-tensor lists
are cast to the ``param_dtype`` when it is set, integer/bool tensors keep their dtype; bool, int,
float, str and None pass through; **everything else is silently dropped** (dicts, lists of dicts,
lists of str/float, tuples, numpy arrays, custom objects).
#28 ``module_name_match``: ``{*}`` digits, ``{a-b}`` an integer range, ``*``/``?`` wildcards, anchored.
"""

import os
import random
import re
from typing import Any, Dict, Optional

import numpy as np
import torch

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
TOKEN_COUNT_KEYS = ("avg_per_step_token_num", "global_step_token_num")


def get_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unsupported dtype: {name}")
    return DTYPES[name]


def get_device_type() -> str:
    return "cpu"


def move_to_device(batch: Dict[str, Any], float_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    device = get_device_type()
    moved: Dict[str, Any] = {}
    for key, value in batch.items():
        if key in TOKEN_COUNT_KEYS:
            moved[key] = value.to(device=device)
        elif isinstance(value, torch.Tensor):
            moved[key] = value.to(
                device=device, dtype=float_dtype if torch.is_floating_point(value) else None
            )
        elif isinstance(value, list) and all(isinstance(item, torch.Tensor) for item in value):
            moved[key] = [
                item.to(device=device, dtype=float_dtype if torch.is_floating_point(item) else None)
                for item in value
            ]
        elif isinstance(value, (bool, int, float, str)) or value is None:
            moved[key] = value
    return moved


def set_seed(seed: int, set_deterministic: bool = False) -> None:
    """MindSpeed's ``set_seed``: python, numpy, torch, PYTHONHASHSEED; deterministic algorithms on request."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if set_deterministic:
        os.environ["HCCL_DETERMINISTIC"] = "true"
        torch.use_deterministic_algorithms(True)


def _pattern_to_regex(pattern: str) -> str:
    pieces = []
    position = 0
    for match in re.finditer(r"\{\*\}|\{(\d+)-(\d+)\}|\*|\?", pattern):
        pieces.append(re.escape(pattern[position : match.start()]))
        token = match.group(0)
        if token == "{*}":
            pieces.append(r"\d+")
        elif token == "*":
            pieces.append(".*")
        elif token == "?":
            pieces.append(".")
        else:
            low, high = int(match.group(1)), int(match.group(2))
            pieces.append("(?:" + "|".join(str(i) for i in range(low, high + 1)) + ")")
        position = match.end()
    pieces.append(re.escape(pattern[position:]))
    return "".join(pieces)


def module_name_match(pattern: str, name: str) -> bool:
    return re.fullmatch(_pattern_to_regex(pattern), name) is not None


def configure_hsdp_gradient_sync(model: torch.nn.Module, is_last_step: bool) -> None:
    """#18: the root must offer both methods (FSDP2 roots do)."""
    model.set_is_last_backward(is_last_step)
    model.set_requires_all_reduce(is_last_step)
