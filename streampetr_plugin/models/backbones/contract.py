"""The backbone contract shared by every image backbone (built-in or from a plugin).

A backbone maps a batch of images ``(N, 3, H, W)`` to a dict of named feature maps and declares,
through ``output_shape()``, the channels and stride of each one, so that necks and heads are sized
from the declaration rather than from hard-coded channel numbers (detectron2's contract).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (input pixels per feature cell) of one feature map."""

    channels: int
    stride: int


@runtime_checkable
class Backbone(Protocol):
    """What a backbone must provide. Output names are ordered from fine to coarse."""

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:  # (N, 3, H, W) -> {name: (N, C, h, w)}
        ...

    def output_shape(self) -> Dict[str, ShapeSpec]:
        ...
