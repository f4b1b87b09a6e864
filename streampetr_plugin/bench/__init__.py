"""``streampetr bench``: step time, throughput, memory and FLOPs of a recipe, on synthetic inputs.

Entry points: :func:`streampetr_plugin.bench.command.bench_command` (the command as a function) and
:func:`streampetr_plugin.bench.command.add_bench_arguments` (its argparse arguments). This package
module stays free of heavy imports so that building the CLI parser does not import torch.
"""
from __future__ import annotations

from typing import Tuple

VARIANT_GROUPS: Tuple[str, ...] = ("attention", "checkpointing", "amp", "channels_last", "fused_optimizer")

__all__ = ["VARIANT_GROUPS"]
