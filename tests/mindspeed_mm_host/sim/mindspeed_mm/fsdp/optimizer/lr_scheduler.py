"""SIMULATION of ``mindspeed_mm/fsdp/optimizer/lr_scheduler.py`` (#20).

A ``LambdaLR`` stepped once per iteration. ``warmup = int(train_iters * warmup_ratio)`` steps go
linearly from ``lr_start`` to ``lr``; then ``constant`` stays, ``linear`` decays (not below
``lr_min``), ``cosine`` follows a half cosine to ``lr_min`` over ``int(train_iters * decay_ratio)``
steps and stays there. Every group is scaled by the same factor. Unknown styles raise ``ValueError``.
"""

import math

from torch.optim.lr_scheduler import LambdaLR


def build_lr_scheduler(
    optimizer,
    *,
    train_steps: int,
    lr: float,
    lr_decay_style: str = "constant",
    lr_decay_ratio: float = 1.0,
    lr_warmup_ratio: float = 0.0,
    lr_min: float = 1e-7,
    lr_start: float = 0.0,
) -> LambdaLR:
    warmup = int(train_steps * lr_warmup_ratio)
    decay_steps = int(train_steps * lr_decay_ratio)
    if lr_decay_style not in ("constant", "linear", "cosine"):
        raise ValueError(f"Unknown learning rate decay style: {lr_decay_style}.")

    def factor(step: int) -> float:
        if lr == 0:
            return 0.0
        if step < warmup:
            return (lr_start + (lr - lr_start) * step / max(1, warmup)) / lr
        min_ratio = lr_min / lr
        if lr_decay_style == "constant":
            return 1.0
        if lr_decay_style == "linear":
            return max(min_ratio, float(train_steps - step) / float(max(1, train_steps - warmup)))
        if step > decay_steps:
            return min_ratio
        progress = float(step - warmup) / float(max(1, decay_steps - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - min_ratio) + min_ratio)

    return LambdaLR(optimizer, factor)
