"""One benchmarked configuration, set up and stepped by the trainer's own start-up and step.

The device comes from :func:`~streampetr_plugin.training.startup.select_device`, the model and optimiser
of every configuration from :func:`~streampetr_plugin.training.startup.build_device_model` and
:func:`~streampetr_plugin.training.startup.build_run_optimizer` (with the variant's model settings in
between), and :meth:`BenchRun.train_step` is :class:`~streampetr_plugin.training.step.TrainStep`. The
only differences from a training run: one process (no DDP wrapper), a constant learning rate, no data
loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from streampetr_plugin.adapters.base import AdapterRecord, Status
from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.models.layers.multihead_attention import MultiheadAttentionCore
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.training.startup import build_device_model, build_run_optimizer, selection_for
from streampetr_plugin.training.step import TrainStep, total_loss


@dataclass
class ModelSettings:
    """Changes a variant makes to the built model (None: leave as the recipe and adapters made it)."""

    attention_backend: Optional[str] = None
    checkpointing: Optional[bool] = None
    channels_last: Optional[bool] = None


def adapter_rows(records: List[AdapterRecord]) -> List[Dict[str, str]]:
    """Adapter records as plain dicts (``phase``, ``name``, ``status``, ``reason``) for the report."""
    return [
        {"phase": r.phase.value, "name": r.name, "status": r.status.value, "reason": r.reason}
        for r in records
    ]


def attention_modules(model: nn.Module) -> List[MultiheadAttentionCore]:
    return [module for module in model.modules() if isinstance(module, MultiheadAttentionCore)]


def checkpointable_modules(model: nn.Module) -> List[nn.Module]:
    """Modules with a boolean ``with_cp`` switch (backbone blocks, decoder layers)."""
    return [module for module in model.modules() if isinstance(getattr(module, "with_cp", None), bool)]


def backbone_is_channels_last(model: nn.Module) -> Optional[bool]:
    """Whether the image backbone's spatial convolution weights are channels-last (None: no backbone)."""
    backbone = getattr(model, "img_backbone", None)
    if backbone is None:
        return None
    for param in backbone.parameters():
        if param.dim() == 4 and param.shape[-1] > 1:
            return param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
    return False


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


@dataclass
class BenchRun:
    """A model, optimiser and precision set up for ``recipe`` on ``device`` (see the module docstring).

    ``settings`` says what is in effect, one entry per variant group (``attention``, ``checkpointing``,
    ``amp``, ``channels_last``, ``fused_optimizer``, ``graph_capture``), in the same words as the variant
    options.
    """

    recipe: Recipe
    device: DeviceHandle
    host: PluginHost
    model_settings: ModelSettings = field(default_factory=ModelSettings)

    def __post_init__(self) -> None:
        recipe, host = self.recipe, self.host
        torch.manual_seed(recipe.runtime.seed)
        selection = selection_for(recipe, host, self.device, how="bench")
        self.adapters = selection.adapters
        self.model, self.precision = build_device_model(recipe, host, selection)
        self._apply_model_settings(self.model)
        self.optimizer: Optional[torch.optim.Optimizer] = build_run_optimizer(
            self.model, recipe, host, selection
        )
        self.step = TrainStep(model=self.model, optimizer=self.optimizer, precision=self.precision,
                              grad_clip=recipe.optimization.grad_clip)
        self.nonfinite_steps = 0

    def _apply_model_settings(self, model: nn.Module) -> None:
        wanted = self.model_settings
        if wanted.attention_backend is not None:
            attend = self.host.registries.attention_backends.build(wanted.attention_backend, {})
            for module in attention_modules(model):
                module.use_backend(wanted.attention_backend, attend)
        if wanted.checkpointing is not None:
            for module in checkpointable_modules(model):
                module.with_cp = wanted.checkpointing
        if wanted.channels_last is not None and getattr(model, "img_backbone", None) is not None:
            layout = torch.channels_last if wanted.channels_last else torch.contiguous_format
            model.img_backbone.to(memory_format=layout)

    # --------------------------------------------------------------------------------------- settings

    def settings(self) -> Dict[str, str]:
        """What this configuration runs, per variant group ("n/a" where the model has no such part)."""
        model = self.model
        backends = sorted({module.backend for module in attention_modules(model)})
        switches = [module.with_cp for module in checkpointable_modules(model)]
        if not switches:
            checkpointing = "n/a"
        elif all(switches) or not any(switches):
            checkpointing = _on_off(all(switches))
        else:
            checkpointing = f"mixed ({sum(switches)}/{len(switches)} on)"
        channels_last = backbone_is_channels_last(model)
        dtype = self.precision.dtype
        amp = "fp32" if dtype is None else {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        return {
            "attention": "+".join(backends) or "n/a",
            "checkpointing": checkpointing,
            "amp": amp,
            "channels_last": "n/a" if channels_last is None else _on_off(channels_last),
            "fused_optimizer": _on_off(self.optimizer_is_fused()),
            "graph_capture": _on_off(self.adapters.status("graph_capture") is Status.APPLIED),
            "optimizer": self.describe_optimizer(),
        }

    def optimizer_is_fused(self) -> bool:
        """A single-kernel update: ``torch.optim.AdamW(fused=True)`` or an adapter's own optimiser class."""
        optimizer = self.optimizer
        if optimizer is None:
            return False
        if type(optimizer).__module__.startswith("torch.optim"):
            return bool(optimizer.defaults.get("fused"))
        return True

    def describe_optimizer(self) -> str:
        optimizer = self.optimizer
        if optimizer is None:
            return "released"
        flags = [name for name in ("fused", "foreach") if optimizer.defaults.get(name)]
        name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        return name + (f"({', '.join(flags)})" if flags else "")

    # ------------------------------------------------------------------------------------------ steps

    def train_step(self, batch: Mapping[str, Any]) -> float:
        """One training iteration on a batch already on the device; returns the total loss."""
        result = self.step(batch)
        self.nonfinite_steps += int(result.skipped)
        return result.terms["loss"]

    def forward_backward(self, batch: Mapping[str, Any]) -> None:
        """Forward and backward without an optimiser step (what FLOP counting runs); grads are dropped."""
        with self.precision.autocast():
            losses = self.model(batch).losses
        total_loss(losses).backward()
        self.model.zero_grad(set_to_none=True)

    def infer_step(self, batch: Mapping[str, Any]) -> List[Dict[str, torch.Tensor]]:
        """One streaming inference frame per row, detections copied to the host (as evaluation does)."""
        with torch.no_grad(), self.precision.autocast():
            detections = self.model(batch).detections
        return [{key: value.cpu() for key, value in row.items()} for row in detections]

    def release_training_state(self) -> None:
        """Drop gradients and the optimiser (its state is as large as two copies of the weights)."""
        self.model.zero_grad(set_to_none=True)
        self.optimizer = None
