"""Benchmark variants: one setting changed from the recipe's baseline, per group.

Groups and their options:

* ``attention``: every registered attention backend (``sdpa``, ``math``, and ``npu_fusion_attention``
  once the Ascend adapter registered it), forced on every attention module after the adapters ran;
* ``checkpointing``: ``on`` / ``off``, activation checkpointing of every module with a ``with_cp``
  switch (backbone blocks, decoder layers);
* ``amp``: ``fp32`` / ``fp16`` / ``bf16`` through ``optimization.amp`` (on the CPU ``bf16`` is
  ``optimization.amp.cpu=bf16``; there is no fp16 CPU path);
* ``channels_last``: ``on`` / ``off``, the image backbone's weights (and so its activations) in
  channels-last layout;
* ``fused_optimizer``: ``on`` / ``off``, AdamW as one fused kernel or as torch's multi-tensor
  ``foreach`` update (on NPU, ``on`` is the ``npu_fused_adamw`` adapter's optimiser);
* ``graph_capture``: ``on`` / ``off``, the ``graph_capture`` adapter (``torch.compile`` of the image
  backbone and neck with the recipe's capture options; the warm-up steps take the compilation).

An option equal to what the baseline runs is the baseline itself (not measured twice). An option that
cannot run on this device is reported as skipped, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from streampetr_plugin.adapters.ascend import NPU_ATTENTION_BACKEND
from streampetr_plugin.adapters.capture import GraphCapture, cpp_compiler
from streampetr_plugin.adapters.device import DeviceHandle, torch_npu_installed
from streampetr_plugin.bench import VARIANT_GROUPS
from streampetr_plugin.bench.train_step import ModelSettings
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.registry import Registry
from streampetr_plugin.training.precision import cpu_has_native_bf16

BUILTIN_ATTENTION_BACKENDS: Tuple[str, ...] = ("sdpa", "math", NPU_ATTENTION_BACKEND)
AFFECTS_INFERENCE = {"attention": True, "checkpointing": False, "amp": True, "channels_last": True,
                     "fused_optimizer": False, "graph_capture": True}


@dataclass(frozen=True)
class Variant:
    """One option of one group (see the module docstring)."""

    group: str
    option: str

    @property
    def name(self) -> str:
        return f"{self.group}={self.option}"

    @property
    def affects_inference(self) -> bool:
        return AFFECTS_INFERENCE[self.group]

    def recipe_overrides(self, device_kind: str) -> List[str]:
        """Recipe overrides that make this variant (amp and optimiser); empty for model-side variants."""
        if self.group == "amp":
            if self.option == "fp32":
                return ["optimization.amp.enabled=false"]
            if device_kind == "cpu":
                return ["optimization.amp.enabled=true", f"optimization.amp.cpu={self.option}"]
            return ["optimization.amp.enabled=true", f"optimization.amp.dtype={self.option}"]
        if self.group == "fused_optimizer":
            if self.option == "off":
                return ["optimization.optimizer.implementation=foreach"]
            # On NPU the adapter supplies the fused optimiser when the implementation is left to it.
            implementation = "auto" if device_kind == "npu" else "fused"
            return [f"optimization.optimizer.implementation={implementation}"]
        if self.group == "graph_capture":
            return [f"accelerator.adapters.graph_capture.enabled={'true' if self.option == 'on' else 'false'}"]
        return []

    def model_settings(self) -> ModelSettings:
        """Model-side changes applied after the adapters (attention, checkpointing, channels-last)."""
        if self.group == "attention":
            return ModelSettings(attention_backend=self.option)
        if self.group == "checkpointing":
            return ModelSettings(checkpointing=self.option == "on")
        if self.group == "channels_last":
            return ModelSettings(channels_last=self.option == "on")
        return ModelSettings()

    def unavailable_reason(
        self, device: DeviceHandle, recipe: Recipe, baseline: Dict[str, str], attention_backends: Registry
    ) -> Optional[str]:
        """Why this variant cannot run here, or None when it can (``attention_backends``: the registry the
        attention options come from)."""
        if baseline.get(self.group) == "n/a":
            part = {"attention": "attention modules", "checkpointing": "modules with a with_cp switch",
                    "channels_last": "img_backbone"}.get(self.group, self.group)
            return f"the model has no {part}"
        if self.group == "attention" and self.option not in attention_backends:
            return f"attention backend {self.option!r} is not registered"
        if self.group == "attention" and self.option == NPU_ATTENTION_BACKEND and not torch_npu_installed():
            return "needs torch_npu: the npu_fusion_attention kernel runs on NPU"
        if self.group == "amp" and self.option != "fp32":
            if device.kind == "cpu" and self.option == "fp16":
                return "the CPU runs fp32 or bf16 (optimization.amp.cpu)"
            if device.kind == "cpu" and not cpu_has_native_bf16():
                return "this CPU has no native bf16 (AVX512_BF16 or AMX)"
            if device.kind == "cuda" and self.option == "bf16" and not torch.cuda.is_bf16_supported():
                return "this GPU has no bf16 support"
        if self.group == "fused_optimizer":
            optimizer = recipe.optimization.optimizer.type
            if optimizer != "adamw":
                return f"the recipe's optimizer is {optimizer!r}; fused/foreach are AdamW implementations"
            if self.option == "on" and device.kind != "npu":
                return _fused_adamw_unavailable(device)
        if self.group == "graph_capture" and self.option == "on":
            if device.kind not in GraphCapture.devices:
                return f"the graph_capture adapter runs on {', '.join(GraphCapture.devices)}"
            if device.kind == "cpu" and cpp_compiler()[0] is None:
                return "inductor on the CPU needs a C++ compiler"
        return None


def _fused_adamw_unavailable(device: DeviceHandle) -> Optional[str]:
    """Why ``torch.optim.AdamW(fused=True)`` cannot step a parameter on ``device``, or None."""
    probe = torch.nn.Parameter(torch.zeros(1, device=device.torch_device))
    try:
        optimizer = torch.optim.AdamW([probe], lr=1e-3, fused=True)
        probe.grad = torch.ones_like(probe)
        optimizer.step()
    except (RuntimeError, TypeError) as error:
        return f"torch.optim.AdamW(fused=True) does not run on {device.kind}: {error}"
    return None


def group_options(group: str, attention_backends: Registry) -> Tuple[str, ...]:
    """The options of ``group``; attention lists the built-in backends and any others registered in
    ``attention_backends``."""
    if group == "attention":
        extra = [name for name in attention_backends.names() if name not in BUILTIN_ATTENTION_BACKENDS]
        return BUILTIN_ATTENTION_BACKENDS + tuple(extra)
    return {
        "checkpointing": ("on", "off"),
        "amp": ("fp32", "fp16", "bf16"),
        "channels_last": ("on", "off"),
        "fused_optimizer": ("on", "off"),
        "graph_capture": ("on", "off"),
    }[group]


def expand_groups(requested: Tuple[str, ...]) -> Tuple[str, ...]:
    """Group names in canonical order; ``all`` stands for every group. Unknown names raise ValueError."""
    names = set(requested)
    if "all" in names:
        return VARIANT_GROUPS
    unknown = sorted(names - set(VARIANT_GROUPS))
    if unknown:
        raise ValueError(
            f"unknown variant group(s) {', '.join(unknown)}; choose from {', '.join(VARIANT_GROUPS)}, all"
        )
    return tuple(group for group in VARIANT_GROUPS if group in names)
