"""VoVNet-eSE image backbone (V2-99 of the StreamPETR recipe), with activation checkpointing.

A VoVNet is a stem of three 3x3 conv-BN-ReLU layers (strides 2, 1, 2) followed by four stages of
One-Shot-Aggregation (OSA) blocks. An OSA block runs ``layers_per_block`` successive 3x3 conv-BN-ReLU
layers, concatenates its input with every layer's output, projects the concatenation with a 1x1
conv-BN-ReLU and gates it with effective squeeze-excitation (eSE). Stages 3-5 start with a 3x3 max
pool of stride 2 (``ceil_mode=True``); the second and later blocks of a stage add their input back.

Module and parameter names reproduce the reference ``VoVNetCP`` (``vovnetcp.py``) so that its
checkpoints load key for key, e.g. ``stage4.OSA4_2.layers.0.OSA4_2_0/conv.weight``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Literal, Tuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from streampetr_plugin.models.backbones.contract import ShapeSpec
from streampetr_plugin.models.backbones.freezing import freeze, keep_frozen_in_train_mode

STAGE_NAMES: Tuple[str, ...] = ("stage2", "stage3", "stage4", "stage5")
FEATURE_NAMES: Tuple[str, ...] = ("stem",) + STAGE_NAMES


@dataclass(frozen=True)
class VoVNetSpec:
    """Widths and depths of one VoVNet variant."""

    stem_channels: Tuple[int, int, int]
    stage_conv_channels: Tuple[int, int, int, int]  # width of the 3x3 layers inside each stage's blocks
    stage_out_channels: Tuple[int, int, int, int]  # width after the 1x1 aggregation of each stage
    layers_per_block: int
    blocks_per_stage: Tuple[int, int, int, int]


_WIDE = dict(
    stem_channels=(64, 64, 128),
    stage_conv_channels=(128, 160, 192, 224),
    stage_out_channels=(256, 512, 768, 1024),
    layers_per_block=5,
)

VOVNET_SPECS: Dict[str, VoVNetSpec] = {
    # The reference's eSE variants (vovnetcp.py:60-88).
    "V-39-eSE": VoVNetSpec(blocks_per_stage=(1, 1, 2, 2), **_WIDE),
    "V-57-eSE": VoVNetSpec(blocks_per_stage=(1, 1, 4, 3), **_WIDE),
    "V-99-eSE": VoVNetSpec(blocks_per_stage=(1, 3, 9, 3), **_WIDE),
    # Not a reference network: the same architecture at toy width for CPU tests and smoke recipes
    # (two blocks in stages 4 and 5 so that the residual path of later blocks is exercised).
    "V-tiny": VoVNetSpec(
        stem_channels=(8, 8, 16),
        stage_conv_channels=(8, 8, 16, 16),
        stage_out_channels=(16, 24, 32, 48),
        layers_per_block=2,
        blocks_per_stage=(1, 1, 2, 2),
    ),
}

SpecName = Literal["V-39-eSE", "V-57-eSE", "V-99-eSE", "V-tiny"]
FeatureName = Literal["stem", "stage2", "stage3", "stage4", "stage5"]


def _conv_norm_relu(
    name: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> List[Tuple[str, nn.Module]]:
    """Named (conv without bias, BatchNorm, ReLU) triple, named ``{name}/conv`` etc. as the reference."""
    return [
        (
            f"{name}/conv",
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
            ),
        ),
        (f"{name}/norm", nn.BatchNorm2d(out_channels)),
        (f"{name}/relu", nn.ReLU(inplace=True)),
    ]


class EffectiveSqueezeExcitation(nn.Module):
    """eSE gate: ``x * hard_sigmoid(fc(global_avg_pool(x)))`` with ``hard_sigmoid = relu6(z + 3) / 6``."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        gate = self.fc(F.adaptive_avg_pool2d(x, 1))  # (N, C, 1, 1)
        return x * (F.relu6(gate + 3.0) / 6.0)


class OSABlock(nn.Module):
    """One-shot aggregation block: ``(N, in_channels, H, W) -> (N, out_channels, H, W)``."""

    def __init__(
        self,
        *,
        name: str,
        in_channels: int,
        conv_channels: int,
        out_channels: int,
        num_layers: int,
        residual: bool,
        with_cp: bool,
    ) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(f"{name}: a residual block needs in_channels == out_channels")
        self.residual = residual
        self.with_cp = with_cp
        self.layers = nn.ModuleList()
        channels = in_channels
        for index in range(num_layers):
            self.layers.append(
                nn.Sequential(OrderedDict(_conv_norm_relu(f"{name}_{index}", channels, conv_channels, 3)))
            )
            channels = conv_channels
        aggregated = in_channels + num_layers * conv_channels
        self.concat = nn.Sequential(
            OrderedDict(_conv_norm_relu(f"{name}_concat", aggregated, out_channels, 1))
        )
        self.ese = EffectiveSqueezeExcitation(channels=out_channels)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        y = self.ese(self.concat(torch.cat(outputs, dim=1)))  # (N, out_channels, H, W)
        return y + x if self.residual else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            # Recompute the block in backward instead of keeping its 5 intermediate maps.
            return checkpoint(self._block, x, use_reentrant=False)
        return self._block(x)


class OSAStage(nn.Sequential):
    """Optional stride-2 max pool (``Pooling``) then blocks ``OSA{n}_1 .. OSA{n}_k``."""

    def __init__(
        self,
        *,
        stage_number: int,
        in_channels: int,
        conv_channels: int,
        out_channels: int,
        num_blocks: int,
        layers_per_block: int,
        with_cp: bool,
    ) -> None:
        super().__init__()
        if stage_number != 2:
            self.add_module("Pooling", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        for block_index in range(num_blocks):
            name = f"OSA{stage_number}_{block_index + 1}"
            block = OSABlock(
                name=name,
                in_channels=in_channels if block_index == 0 else out_channels,
                conv_channels=conv_channels,
                out_channels=out_channels,
                num_layers=layers_per_block,
                residual=block_index > 0,
                with_cp=with_cp,
            )
            self.add_module(name, block)


class VoVNet(nn.Module):
    """VoVNet-eSE backbone implementing the backbone contract (``contract.Backbone``).

    ``forward(images (N, 3, H, W))`` returns ``{name: (N, C, h, w)}`` for each name of
    ``out_features`` in network order (fine to coarse); strides are stem 4, stage2 4, stage3 8,
    stage4 16, stage5 32 (the stem maps n to ceil(n / 2) twice, each pool n to floor(n / 2)). For
    V-99-eSE: stage4 has 768 channels and stage5 1024.

    ``frozen_stages = k`` freezes the stem (k >= 0) and stages 2..k+1 (parameters not trainable,
    BatchNorm in eval mode). ``norm_eval`` keeps every BatchNorm in eval mode during training (the
    affine parameters stay trainable). ``with_cp`` checkpoints each OSA block in training.
    """

    def __init__(self, params: VoVNetParams) -> None:
        super().__init__()
        spec = VOVNET_SPECS[params.spec_name]
        self.spec = spec
        self.out_features: Tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n in params.out_features)
        self.frozen_stages = params.frozen_stages
        self.norm_eval = params.norm_eval

        stem_a, stem_b, stem_c = spec.stem_channels
        self.stem = nn.Sequential(
            OrderedDict(
                _conv_norm_relu("stem_1", 3, stem_a, 3, stride=2)
                + _conv_norm_relu("stem_2", stem_a, stem_b, 3)
                + _conv_norm_relu("stem_3", stem_b, stem_c, 3, stride=2)
            )
        )
        self._shapes: Dict[str, ShapeSpec] = {"stem": ShapeSpec(channels=stem_c, stride=4)}
        in_channels, stride = stem_c, 4
        for index, name in enumerate(STAGE_NAMES):
            stride = stride if index == 0 else stride * 2
            stage = OSAStage(
                stage_number=index + 2,
                in_channels=in_channels,
                conv_channels=spec.stage_conv_channels[index],
                out_channels=spec.stage_out_channels[index],
                num_blocks=spec.blocks_per_stage[index],
                layers_per_block=spec.layers_per_block,
                with_cp=params.with_cp,
            )
            self.add_module(name, stage)
            in_channels = spec.stage_out_channels[index]
            self._shapes[name] = ShapeSpec(channels=in_channels, stride=stride)
        freeze(self._frozen_modules())

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of each returned feature map, in output order."""
        return {name: self._shapes[name] for name in self.out_features}

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``images (N, 3, H, W) -> {name: (N, C_name, ~H / stride, ~W / stride)}``."""
        features: Dict[str, torch.Tensor] = {}
        x = self.stem(images)
        if "stem" in self.out_features:
            features["stem"] = x
        # Every stage runs, as in the reference, so that all parameters receive gradients (DDP).
        for name in STAGE_NAMES:
            x = getattr(self, name)(x)
            if name in self.out_features:
                features[name] = x
        return features

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [getattr(self, STAGE_NAMES[i]) for i in range(self.frozen_stages)]

    def train(self, mode: bool = True) -> "VoVNet":
        """Set training mode, keeping frozen stages (and every BatchNorm if ``norm_eval``) in eval."""
        super().train(mode)
        keep_frozen_in_train_mode(self, self._frozen_modules(), norm_eval=self.norm_eval, mode=mode)
        return self


class VoVNetParams(BaseModel):
    """User settings of :class:`VoVNet`; defaults are the V2-99 recipe (VoVNetCP in vov.py)."""

    model_config = ConfigDict(extra="forbid")

    spec_name: SpecName = Field(
        default="V-99-eSE",
        description="Network variant: V-39/57/99-eSE as the reference, or V-tiny (toy width, tests only).",
    )
    out_features: List[FeatureName] = Field(
        default=["stage4", "stage5"],
        min_length=1,
        description="Feature maps returned, from 'stem', 'stage2' .. 'stage5' (strides 4, 4, 8, 16, 32).",
    )
    frozen_stages: int = Field(
        default=-1,
        ge=-1,
        le=4,
        description="-1: nothing frozen; k >= 0: freeze the stem and stages 2..k+1 (weights and BatchNorm).",
    )
    norm_eval: bool = Field(
        default=True, description="Keep every BatchNorm in eval mode (running statistics fixed) in training."
    )
    with_cp: bool = Field(
        default=True, description="Activation checkpointing of each OSA block in training (saves memory)."
    )
