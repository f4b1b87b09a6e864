"""Frozen stages and ``norm_eval``: the training-mode rules both built-in backbones share."""
from __future__ import annotations

from typing import Iterable

from torch import nn


def freeze(modules: Iterable[nn.Module]) -> None:
    """Eval mode and no gradients for ``modules`` (the backbone's frozen stages)."""
    for module in modules:
        module.eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def keep_frozen_in_train_mode(
    backbone: nn.Module, frozen: Iterable[nn.Module], *, norm_eval: bool, mode: bool
) -> None:
    """After ``backbone.train(mode)``: frozen stages stay in eval, and with ``norm_eval`` every
    BatchNorm keeps its running statistics fixed (eval mode) while training."""
    freeze(frozen)
    if mode and norm_eval:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
