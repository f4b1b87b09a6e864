"""``streampetr bench``: step time, throughput, memory and FLOPs of a recipe, on synthetic inputs.

Entry point: :func:`streampetr_plugin.bench.command.bench_command` (the command as a function; its
command line is :mod:`streampetr_plugin.cli.bench`). This package module stays free of heavy imports so
that building the CLI parser does not import torch.
"""
from __future__ import annotations

from typing import Tuple

VARIANT_GROUPS: Tuple[str, ...] = (
    "attention", "checkpointing", "amp", "channels_last", "fused_optimizer", "graph_capture",
)

__all__ = ["VARIANT_GROUPS"]
