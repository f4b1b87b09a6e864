"""ResNet-50/101 image backbone (the StreamPETR R50 recipe), without torchvision.

Bottleneck ResNet in the "pytorch" style (the stride of a downsampling block sits on its 3x3 conv).
Module names are those of mmdet's ``ResNet`` and torchvision's ``resnet50`` (``conv1``, ``bn1``,
``layer1..4``, blocks with ``conv1..3`` / ``bn1..3`` / ``downsample.0`` / ``downsample.1``), so the
reference checkpoints and torchvision's ImageNet weights load key for key.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Literal, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from streampetr_plugin.models.backbones.contract import ShapeSpec
from streampetr_plugin.models.backbones.freezing import freeze, keep_frozen_in_train_mode

BLOCKS_PER_STAGE: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_WIDTHS: Tuple[int, int, int, int] = (64, 128, 256, 512)  # bottleneck width; output is 4x that
EXPANSION = 4


class Bottleneck(nn.Module):
    """``relu(x + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))``; the stride is on ``conv2``.

    ``(N, in_channels, H, W) -> (N, 4 * width, H / stride, W / stride)``; ``downsample`` (1x1 conv +
    BN) projects the identity when the shape changes.
    """

    # bn(conv(x)) pairs for BatchNorm folding (streampetr_plugin.models.batchnorm_folding).
    conv_bn_pairs: ClassVar[Tuple[Tuple[str, str], ...]] = (
        ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")
    )

    def __init__(self, *, in_channels: int, width: int, stride: int, with_cp: bool) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.with_cp = with_cp
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def _residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            # Recompute the block in backward (mmdet checkpoints the same span: all but the last ReLU).
            return self.relu(checkpoint(self._residual_sum, x, use_reentrant=False))
        return self.relu(self._residual_sum(x))


class ResNet(nn.Module):
    """Bottleneck ResNet implementing the backbone contract (``contract.Backbone``).

    ``forward(images (N, 3, H, W))`` returns ``{"res{i+2}": (N, C, h, w)}`` for each ``i`` of
    ``out_indices`` (stage index 0..3: channels 256, 512, 1024, 2048, strides 4, 8, 16, 32). The R50
    recipe's ``out_indices = (2, 3)`` gives ``res4`` (1024, stride 16) and ``res5`` (2048, stride 32).

    ``frozen_stages = k`` freezes the stem (k >= 0) and ``layer1..layerk``; ``norm_eval`` keeps every
    BatchNorm in eval mode in training; ``norm_requires_grad = False`` makes every BatchNorm's affine
    parameters non-trainable (the recipe's ``norm_cfg=dict(type='BN2d', requires_grad=False)``);
    ``with_cp`` checkpoints each bottleneck in training.
    """

    conv_bn_pairs: ClassVar[Tuple[Tuple[str, str], ...]] = (("conv1", "bn1"),)  # the stem

    def __init__(self, params: ResNetParams) -> None:
        super().__init__()
        self.out_indices: Tuple[int, ...] = tuple(sorted(set(params.out_indices)))
        self.frozen_stages = params.frozen_stages
        self.norm_eval = params.norm_eval

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        self._shapes: Dict[str, ShapeSpec] = {}
        for index, (num_blocks, width) in enumerate(zip(BLOCKS_PER_STAGE[params.depth], STAGE_WIDTHS)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(
                    Bottleneck(
                        in_channels=in_channels,
                        width=width,
                        stride=stride if block_index == 0 else 1,
                        with_cp=params.with_cp,
                    )
                )
                in_channels = width * EXPANSION
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self._shapes[f"res{index + 2}"] = ShapeSpec(channels=in_channels, stride=4 * 2**index)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.requires_grad_(params.norm_requires_grad)
                module.bias.requires_grad_(params.norm_requires_grad)
        freeze(self._frozen_modules())

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of each returned feature map, in output order."""
        return {f"res{i + 2}": self._shapes[f"res{i + 2}"] for i in self.out_indices}

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``images (N, 3, H, W) -> {"res{i+2}": (N, C_i, H / stride_i, W / stride_i)}`` (rounded up)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (N, 64, H/4, W/4)
        features: Dict[str, torch.Tensor] = {}
        # Every stage runs, as in mmdet, so that all parameters receive gradients (DDP).
        for index in range(4):
            x = getattr(self, f"layer{index + 1}")(x)
            if index in self.out_indices:
                features[f"res{index + 2}"] = x
        return features

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def train(self, mode: bool = True) -> "ResNet":
        """Set training mode, keeping frozen stages (and every BatchNorm if ``norm_eval``) in eval."""
        super().train(mode)
        keep_frozen_in_train_mode(self, self._frozen_modules(), norm_eval=self.norm_eval, mode=mode)
        return self


class ResNetParams(BaseModel):
    """User settings of :class:`ResNet`; defaults are the R50 recipe's (stream_petr_r50_flash_704...)."""

    model_config = ConfigDict(extra="forbid")

    depth: Literal[50, 101] = Field(default=50, description="Number of layers: 50 or 101.")
    out_indices: List[int] = Field(
        default=[2, 3],
        min_length=1,
        description="Stages returned (0..3 -> res2..res5: 256/512/1024/2048 channels, strides 4/8/16/32).",
    )
    frozen_stages: int = Field(
        default=-1, ge=-1, le=4, description="-1: nothing frozen; k >= 0: freeze the stem and layer1..layerk."
    )
    norm_eval: bool = Field(
        default=True, description="Keep every BatchNorm in eval mode (running statistics fixed) in training."
    )
    norm_requires_grad: bool = Field(
        default=False,
        description="Whether BatchNorm scale and shift are trainable (the recipe freezes them).",
    )
    with_cp: bool = Field(
        default=True,
        description="Activation checkpointing of each bottleneck block in training (saves memory).",
    )

    @field_validator("out_indices")
    @classmethod
    def _indices_in_range(cls, value: List[int]) -> List[int]:
        if any(not 0 <= i <= 3 for i in value):
            raise ValueError(f"out_indices must lie in 0..3, got {value}")
        return value
