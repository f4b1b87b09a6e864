"""SIMULATION of ``mindspeed_mm/fsdp/distributed/fully_shard_parallel.py`` (#7, #14, #18).

DDP path (``fully_shard_parallel_size == 1``, no meta init): every parameter whose name lacks
"lora" is cast to ``fsdp_plan.param_dtype`` when set (buffers are not), then
``DDP(find_unused_parameters=True)``, so parameter names gain ``module.``.
FSDP2 path, as a stand-in without sharding: a model whose ``fully_shard(fsdp_plan=...)`` returns
truthy is left alone; otherwise every module matching ``apply_modules`` (children first) and the root
are "wrapped": with ``cast_forward_inputs`` and a ``param_dtype``, a pre-forward hook casts every
floating tensor in the module's args/kwargs, nested containers included (PyTorch's
``FSDPState._pre_forward``); no match raises ``RuntimeError``; the root gains
``set_is_last_backward`` / ``set_requires_all_reduce``. Mixed-precision *parameters* of real FSDP2
are not reproduced.
"""

import logging
from typing import Any, Dict, List, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mindspeed_mm.fsdp.distributed.parallel_state import get_parallel_state
from mindspeed_mm.fsdp.params.argument import FSDPPlanConfig, TrainingArguments
from mindspeed_mm.fsdp.utils.log import print_rank
from mindspeed_mm.fsdp.utils.utils import get_dtype, module_name_match

logger = logging.getLogger(__name__)


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if torch.is_floating_point(value) else value
    if isinstance(value, dict):
        return {key: _cast_floating(item, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floating(item, dtype) for item in value)
    return value


def _post_order(model: nn.Module, prefix: str = ""):
    for name, child in model.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, model


def _fully_shard_stand_in(module: nn.Module, plan: FSDPPlanConfig) -> None:
    if plan.param_dtype and plan.cast_forward_inputs:
        dtype = get_dtype(plan.param_dtype)

        def cast_inputs(_module: nn.Module, args: Tuple, kwargs: Dict) -> Tuple[Tuple, Dict]:
            return _cast_floating(args, dtype), _cast_floating(kwargs, dtype)

        module.register_forward_pre_hook(cast_inputs, with_kwargs=True)


class _FSDPRootMethods:
    """What a real FSDP2 root offers the training loop (#18); records the calls."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, bool]] = []

    def set_is_last_backward(self, value: bool) -> None:
        self.calls.append(("set_is_last_backward", value))

    def set_requires_all_reduce(self, value: bool) -> None:
        self.calls.append(("set_requires_all_reduce", value))


def apply_parallel(model: nn.Module, plan: FSDPPlanConfig, training: TrainingArguments) -> nn.Module:
    state = get_parallel_state()
    if state.fully_shard_parallel_size == 1 and not training.init_model_with_meta_device:
        if plan.param_dtype:
            dtype = get_dtype(plan.param_dtype)
            for name, param in model.named_parameters():
                if "lora" not in name:
                    param.data = param.data.to(dtype=dtype)
        print_rank(logger.info, "DDP mode is enabled (fully_shard_parallel_size=1) instead of FSDP wrapping")
        return DistributedDataParallel(
            model.to("cpu"), process_group=state.get_dp_group(), find_unused_parameters=True
        )

    if callable(getattr(model, "fully_shard", None)) and model.fully_shard(fsdp_plan=plan):
        return model
    if plan.apply_modules:
        matched = [
            module
            for name, module in _post_order(model)
            if any(module_name_match(pattern, name) for pattern in plan.apply_modules)
            and name not in plan.ignored_modules
        ]
        if not matched:
            raise RuntimeError(f"[FSDP2] No module named {plan.apply_modules}.")
        for module in matched:
            _fully_shard_stand_in(module, plan)
    _fully_shard_stand_in(model, plan)
    root = _FSDPRootMethods()
    model.fsdp_root_calls = root.calls
    model.set_is_last_backward = root.set_is_last_backward
    model.set_requires_all_reduce = root.set_requires_all_reduce
    return model
