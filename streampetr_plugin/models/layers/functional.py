"""Small stateless helpers shared by the heads and losses (mmdet / mmcv semantics)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` after clamping it to [0, 1]; both ``x`` and ``1 - x`` are floored at ``eps``.

    This is mmdet's version: the clamp to [0, 1] comes first, so values slightly outside the unit
    range (e.g. frustum points beyond ``position_range``) map to +-log(1 / eps - ...) = +-11.51.
    """
    x = x.clamp(min=0, max=1)
    numerator = x.clamp(min=eps)
    denominator = (1 - x).clamp(min=eps)
    return torch.log(numerator / denominator)


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (host memory) copied to ``device`` without making the host wait: CUDA copies pageable
    memory with ``non_blocking=False`` through a stream synchronisation, while a non-blocking copy is
    staged at once (the source may be freed right after)."""
    return tensor.to(device, non_blocking=True)


def device_constant(
    values: Sequence[float], like: torch.Tensor, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``like.new_tensor(values, dtype=dtype)`` without making the host wait (see :func:`upload`)."""
    return upload(torch.tensor(values, dtype=dtype or like.dtype), like.device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks (all-reduce of ``tensor / world_size``).

    Identity when no process group is initialised.
    """
    if not _distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return tensor


def mean_count_over_ranks(count: float, device: torch.device) -> float | torch.Tensor:
    """``max(reduce_mean(count), 1)``: a Python float without a process group, else a 0-dim tensor on
    ``device`` (a loss normaliser that stays on the device: reading it back would make the host wait)."""
    if not _distributed():
        return max(float(count), 1.0)
    return torch.clamp(reduce_mean(upload(torch.tensor(float(count)), device)), min=1)


def classification_normaliser(count: float, like: torch.Tensor, *, over_ranks: bool) -> float | torch.Tensor:
    """``max(count, 1)``; with ``over_ranks`` (``sync_cls_avg_factor``) the mean of ``count`` over all
    ranks, as a (1,) tensor on ``like``'s device (the reference's shape), clamped there without a read."""
    if not over_ranks:
        return max(float(count), 1.0)
    return torch.clamp(reduce_mean(device_constant([float(count)], like)), min=1)


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias that makes ``sigmoid(bias) == prior_prob`` (focal-loss prior initialisation)."""
    return float(-math.log((1 - prior_prob) / prior_prob))


def clip_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``sigmoid(x)`` clamped to ``[eps, 1 - eps]`` (mmdet3d's, without its in-place side effect)."""
    return torch.clamp(x.sigmoid(), min=eps, max=1 - eps)
