"""CPFPN: the reference's trimmed feature pyramid (``cp_fpn.py``).

A plain FPN top-down path (1x1 lateral convs with bias, nearest upsampling, sum), except that only
level 0 gets the 3x3 output conv: every other level is returned as its bare lateral (the detector
only consumes level 0, so the reference dropped the unused output convs). Key names follow the
reference state dict (``lateral_convs.0.conv.weight``, ``fpn_convs.0.conv.weight``).
"""
from __future__ import annotations

from typing import List, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from streampetr_plugin.models.backbones.contract import ShapeSpec


class ConvLayer(nn.Module):
    """A biased convolution held as ``.conv`` (mmcv ``ConvModule`` without norm or activation)."""

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CPFPN(nn.Module):
    """Feature pyramid over ``len(in_channels)`` backbone levels, fine to coarse.

    ``forward([x_0 (N, in_channels[0], H0, W0), x_1 (N, in_channels[1], H1, W1), ...])`` returns
    ``num_outs`` maps of ``out_channels``: level 0 = ``fpn_conv(lat_0 + up(lat_1 + up(...)))``
    (3x3, same size as ``x_0``), level i > 0 = ``lat_i + up(...)`` without a 3x3 conv; extra levels
    beyond the inputs (``num_outs > len(in_channels)``) subsample the previous output by 2
    (the reference's ``max_pool2d(kernel 1, stride 2)``). Outputs are float32, as the reference's
    ``auto_fp16(out_fp32=True)``, so the head receives fp32 features under mixed precision.
    """

    def __init__(self, params: CPFPNParams, *, in_channels: Sequence[int]) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels must name at least one input level")
        if params.num_outs < len(in_channels):
            raise ValueError(
                f"num_outs ({params.num_outs}) must be >= the number of inputs ({len(in_channels)})"
            )
        out_channels = params.out_channels
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = out_channels
        self.num_outs = params.num_outs
        self.lateral_convs = nn.ModuleList(
            ConvLayer(in_channels=c, out_channels=out_channels, kernel_size=1) for c in self.in_channels
        )
        self.fpn_convs = nn.ModuleList(
            [ConvLayer(in_channels=out_channels, out_channels=out_channels, kernel_size=3)]
        )

    def output_shape(
        self, input_shape: Union[Mapping[str, ShapeSpec], Sequence[ShapeSpec]]
    ) -> List[ShapeSpec]:
        """Channels and stride of every output level, given the backbone's ``output_shape()``."""
        specs = list(input_shape.values()) if isinstance(input_shape, Mapping) else list(input_shape)
        if len(specs) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} input levels, got {len(specs)}")
        strides = [spec.stride for spec in specs]
        while len(strides) < self.num_outs:
            strides.append(strides[-1] * 2)
        return [ShapeSpec(channels=self.out_channels, stride=stride) for stride in strides]

    def forward(
        self, features: Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]
    ) -> List[torch.Tensor]:
        """One ``(N, in_channels[i], H_i, W_i)`` per level (a list, or a backbone's output dict in
        order) -> ``num_outs`` maps ``(N, out_channels, H_i, W_i)``."""
        if isinstance(features, Mapping):
            features = list(features.values())
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature maps, got {len(features)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        for level in range(len(laterals) - 1, 0, -1):
            coarse = F.interpolate(laterals[level], size=laterals[level - 1].shape[-2:], mode="nearest")
            laterals[level - 1] = laterals[level - 1] + coarse
        outputs = [self.fpn_convs[0](laterals[0])] + laterals[1:]
        while len(outputs) < self.num_outs:
            outputs.append(outputs[-1][..., ::2, ::2])
        return [level.float() for level in outputs]


class CPFPNParams(BaseModel):
    """User settings of :class:`CPFPN` (``in_channels`` comes from the backbone's output shape)."""

    model_config = ConfigDict(extra="forbid")

    out_channels: int = Field(default=256, gt=0, description="Channels of every pyramid level.")
    num_outs: int = Field(
        default=2,
        ge=1,
        description="Number of output levels; levels beyond the backbone's are stride-2 subsamples.",
    )
