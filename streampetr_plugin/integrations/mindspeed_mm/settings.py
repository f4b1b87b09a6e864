"""The ``training.*`` values of a MindSpeed-MM YAML that reproduce a recipe's optimisation.

A recipe says "AdamW 4e-4, backbone lr x0.1, clip 35, cosine with 500 warmup iterations over 24
epochs"; the host wants ``lr``, ``lr_scaling_plan``, ``clip_grad``, ``lr_warmup_ratio`` ... This
module does the translation once, so the example YAMLs, the docs and the custom entry's
consistency check agree:

* ``lr_scaling_plan``: the recipe's multipliers match a *substring* of the parameter name, longest
  key first; the host ``re.match``es (anchored at the start) in order, first match wins, on names
  that carry DDP's ``module.`` prefix. ``.*<key>`` in longest-key order is the same rule on both
  name forms.
* warmup: the host warms up ``int(train_iters * lr_warmup_ratio)`` iterations linearly from
  ``lr_start``; the ratio is chosen so that this is exactly the recipe's ``warmup_iters``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Tuple

HOST_OPTIMIZER = "adamw"


def lr_scaling_plan(multipliers: Dict[str, float]) -> List[Dict[str, Any]]:
    """``{substring: multiplier}`` -> the host's ``[{match, scale}]`` with the same outcome."""
    return [
        {"match": f".*{re.escape(key)}", "scale": float(multipliers[key])}
        for key in sorted(multipliers, key=len, reverse=True)
    ]


def train_iters(recipe: Any, world_size: int) -> int:
    """The recipe's iteration count for ``world_size`` devices (streampetr-run's accounting,
    :func:`~streampetr_plugin.training.startup.iteration_plan`, without the dataset at hand)."""
    from streampetr_plugin.training.startup import iteration_plan

    if not recipe.runtime.max_iters and recipe.data.num_train_samples is None:
        raise ValueError("the recipe sets neither runtime.max_iters nor data.num_train_samples")
    return iteration_plan(recipe, num_samples=0, world_size=world_size).max_iters


def recipe_training_settings(recipe: Any, world_size: int) -> Dict[str, Any]:
    """``training.*`` keys and values of the host YAML equivalent to the recipe on ``world_size`` devices."""
    optimizer = recipe.optimization.optimizer
    if optimizer.type != HOST_OPTIMIZER:
        raise ValueError(f"the host builds AdamW only; the recipe asks for {optimizer.type!r}")
    options = optimizer.options()
    lr = float(options["lr"])
    iterations = train_iters(recipe, world_size)
    schedule = recipe.optimization.lr_scheduler.options()
    betas = options.get("betas", (0.9, 0.999))
    clip = recipe.optimization.grad_clip
    return {
        "micro_batch_size": recipe.data.batch_size_per_device,
        "gradient_accumulation_steps": 1,
        "seed": recipe.runtime.seed,
        "train_iters": iterations,
        "lr": lr,
        "lr_decay_style": "cosine",
        "lr_warmup_ratio": (schedule["warmup_iters"] + 0.5) / iterations if schedule["warmup_iters"] else 0.0,
        "lr_start": lr * schedule["warmup_ratio"],
        "lr_min": lr * schedule["min_lr_ratio"],
        "optimizer": HOST_OPTIMIZER,
        "weight_decay": float(options.get("weight_decay", 0.0)),
        "adam_beta1": float(betas[0]),
        "adam_beta2": float(betas[1]),
        "adam_eps": float(options.get("eps", 1e-8)),
        "clip_grad": float(clip.max_norm) if clip is not None else 0.0,
        "lr_scaling_plan": lr_scaling_plan(recipe.optimization.lr_multipliers),
    }


def settings_mismatches(recipe: Any, world_size: int, training: Any) -> List[Tuple[str, Any, Any]]:
    """``(key, host value, recipe value)`` for every ``training.<key>`` that differs from the recipe's."""
    mismatches = []
    for key, expected in recipe_training_settings(recipe, world_size).items():
        actual = getattr(training, key, None)
        if key == "lr_scaling_plan":
            actual = [{"match": entry.match, "scale": float(entry.scale)} for entry in actual or []]
        if isinstance(expected, float) and isinstance(actual, (int, float)):
            same = abs(actual - expected) <= 1e-9 * max(1.0, abs(expected))
        else:
            same = actual == expected
        if not same:
            mismatches.append((key, actual, expected))
    return mismatches
