"""A tiny image backbone for StreamPETR, registered through the ``streampetr`` entry-point group.

Two strided convolution stages give feature maps at strides 16 and 32, which is what the CPFPN neck
and the StreamPETR heads expect; their sizes come from :meth:`TinyBackbone.output_shape`, so a
recipe only names the backbone (``type: tiny``) and its ``width``.
"""
from __future__ import annotations

from typing import Dict

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from streampetr_plugin import hookimpl
from streampetr_plugin.hookspecs import Register
from streampetr_plugin.models.backbones.contract import ShapeSpec

__all__ = ["TinyBackbone", "TinyParams", "streampetr_register_backbones"]


class TinyParams(BaseModel):
    """Recipe options of the ``tiny`` backbone."""

    model_config = ConfigDict(extra="forbid")  # a typo in a recipe is an error, not ignored

    width: int = Field(64, ge=8, description="Channels of both output levels.")


class TinyBackbone(nn.Module):
    """(N, 3, H, W) images -> ``{"stage4": (N, width, H/16, W/16), "stage5": (N, width, H/32, W/32)}``."""

    def __init__(self, params: TinyParams) -> None:
        super().__init__()
        width = self.width = params.width
        # A 4x4 patch embedding, then two stride-2 steps to 1/16 and one more to 1/32.
        self.stage4 = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=4, stride=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.stage5 = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        stage4 = self.stage4(images)  # (N, width, H/16, W/16)
        return {"stage4": stage4, "stage5": self.stage5(stage4)}  # stage5: (N, width, H/32, W/32)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            "stage4": ShapeSpec(channels=self.width, stride=16),
            "stage5": ShapeSpec(channels=self.width, stride=32),
        }


@hookimpl
def streampetr_register_backbones(register: Register) -> None:
    register("tiny", TinyBackbone, params=TinyParams)
