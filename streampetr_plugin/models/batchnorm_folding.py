"""Fold eval-mode BatchNorm into the convolution before it, for inference.

In eval mode a BatchNorm is the per-channel affine map ``y = (x - mean) * gamma / sqrt(var + eps) + beta``
with fixed statistics, so ``bn(conv(x))`` equals one convolution with weight ``w * s`` and bias
``(b - mean) * s + beta`` (``s = gamma / sqrt(var + eps)`` per output channel). Folding removes one
memory-bound pass over every backbone activation. The folded model is for inference only: the
BatchNorms become ``nn.Identity`` (training would no longer update or use their statistics).

Which convolution feeds which BatchNorm is read from the module structure, never guessed from names:

* a plain ``nn.Sequential`` (its forward not overridden) whose child ``Conv2d`` is directly followed by
  a ``BatchNorm2d`` child;
* a module that declares ``conv_bn_pairs``: ``(conv attribute, BatchNorm attribute)`` pairs whose
  forward computes ``bn(conv(x))`` with nothing in between and uses ``conv(x)`` nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class FoldedBatchNorms:
    """``folded``: BatchNorms merged into their convolution; ``left``: BatchNorms still in the model."""

    folded: int
    left: int


def _conv_bn_pairs(model: nn.Module) -> Iterator[Tuple[nn.Module, str, str]]:
    """(parent, convolution name, BatchNorm name) for every structural pair (module docstring)."""
    for parent in model.modules():
        for conv_name, bn_name in getattr(parent, "conv_bn_pairs", ()):
            yield parent, conv_name, bn_name
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            names = list(parent._modules)
            for conv_name, bn_name in zip(names, names[1:]):
                if isinstance(parent._modules[conv_name], nn.Conv2d):
                    yield parent, conv_name, bn_name


@torch.no_grad()
def fold_conv_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make ``conv`` compute ``bn(conv(x))`` of eval mode (``bn`` itself is left as it is)."""
    dtype = conv.weight.dtype
    # float64 for the scale and shift, so that folding adds no rounding beyond the final cast.
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)  # (C_out,)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> FoldedBatchNorms:
    """Fold every eval-mode BatchNorm that directly follows a convolution (module docstring) into it
    and replace the BatchNorm by ``nn.Identity``. ``model`` must be in eval mode."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (it is an inference-only transform)")
    folded = 0
    for parent, conv_name, bn_name in list(_conv_bn_pairs(model)):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        # A BatchNorm without running statistics normalises with the batch's: not an affine map.
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or not bn.track_running_stats:
            continue
        fold_conv_batchnorm(conv, bn)
        setattr(parent, bn_name, nn.Identity())
        folded += 1
    left = sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    return FoldedBatchNorms(folded=folded, left=left)
