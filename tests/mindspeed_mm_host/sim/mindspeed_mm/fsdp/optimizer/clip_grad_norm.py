"""SIMULATION of ``mindspeed_mm/fsdp/optimizer/clip_grad_norm.py`` (#19).

Per-tensor norms (``_foreach_norm``, fp32) raised to p and summed, all-reduced over the FSDP group
when there is one, root taken (this order of operations, not ``clip_grad_norm_``'s norm of norms,
so the result may differ from it in the last bit), then ``clip_grads_with_norm_`` when
``max_norm > 0``. Returns a 0-d tensor.
"""

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_mm.fsdp.distributed.parallel_state import get_parallel_state


def clip_grad_norm(model: nn.Module, max_norm: float, norm_type: float = 2.0, foreach=None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32)
    if params:
        norms = torch._foreach_norm([p.grad.detach().float() for p in params], norm_type)
        total = total + torch.sum(torch.stack(torch._foreach_pow(norms, norm_type)))
    group = get_parallel_state().get_fsdp_group()
    if group is not None:
        dist.all_reduce(total, group=group)
    total = total ** (1.0 / norm_type)
    if max_norm > 0.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total
