"""Ascend NPU adapters: what the DrivingSDK StreamPETR port changes, as named, reported steps.

* ``npu_environment``: the port's runtime variables (``tools/env_model.sh`` and ``test/train_8p.sh``),
  set before ``torch_npu`` is imported and before any device allocation, never overriding a value the
  user exported;
* ``npu_runtime``: ``import torch_npu``, ``allow_internal_format`` and ``set_compile_mode(jit_compile=False)``
  as the port's ``tools/train.py``;
* ``npu_fusion_attention``: selects the fused attention kernel (the ``npu_fusion_attention`` entry of the
  ``attention_backends`` registry, made by :func:`make_npu_fusion_attention`) on the model's attention modules
  (the port calls ``torch_npu.npu_fusion_attention`` for the cross-attention; our self-attention keeps its
  projections, only the dot-product core changes);
* ``npu_fused_adamw``: the optimiser class handed to the AdamW factory, first that works of
  MindSpeed's ``mindspeed.optimizer.adamw.AdamW``, ``torch_npu.optim.NpuFusedAdamW``, torch's AdamW.

HCCL is the NPU's process-group backend (:data:`streampetr_plugin.adapters.device.DISTRIBUTED_BACKENDS`).
``torch_npu`` and ``mindspeed`` are imported only inside these adapters, never at package import.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin.adapters.base import Adapter, AdapterContext, AdapterResult, Phase
from streampetr_plugin.adapters.device import import_torch_npu, torch_npu_installed

NPU_ENVIRONMENT: Dict[str, str] = {
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "TASK_QUEUE_ENABLE": "2",
    "CPU_AFFINITY_CONF": "1",
    "HCCL_CONNECT_TIMEOUT": "1200",
    "HCCL_OP_BASE_FFTS_MODE_ENABLE": "TRUE",
    "MULTI_STREAM_MEMORY_REUSE": "1",
    "ACLNN_CACHE_LIMIT": "1000000",
    "OMP_PROC_BIND": "false",
}

NPU_ATTENTION_BACKEND = "npu_fusion_attention"
# npu_fusion_attention's sparse-window arguments; larger than any sequence here, so no band limit.
_NO_TOKEN_WINDOW = 2147483647


class NpuEnvironmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    extra: Dict[str, str] = Field(
        default_factory=dict, description="More variables to set (same rule: a value already exported wins)."
    )


class NpuEnvironment(Adapter):
    """Set the port's NPU runtime variables where the user has not."""

    name: ClassVar[str] = "npu_environment"
    devices: ClassVar[Tuple[str, ...]] = ("npu",)
    phase: ClassVar[Phase] = Phase.ENVIRONMENT

    def __init__(self, *, extra: Optional[Dict[str, str]] = None) -> None:
        self.variables = {**NPU_ENVIRONMENT, **(extra or {})}

    def apply(self, context: AdapterContext) -> AdapterResult:
        written, kept = [], []
        for key, value in self.variables.items():
            if key in context.environ:
                kept.append(f"{key}={context.environ[key]}")
            else:
                context.environ[key] = value
                written.append(f"{key}={value}")
        parts = [f"set {', '.join(written)}" if written else "nothing to set"]
        if kept:
            parts.append(f"kept the exported {', '.join(kept)}")
        if "torch_npu" in sys.modules:
            parts.append("torch_npu was already imported: export these in the launcher to be sure they apply")
        return AdapterResult.applied("; ".join(parts))


class NpuRuntimeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow_internal_format: bool = Field(
        True, description="torch.npu.config.allow_internal_format (NPU-private tensor formats between ops)."
    )
    jit_compile: bool = Field(
        False, description="torch_npu.npu.set_compile_mode(jit_compile=...); False: pre-compiled binary ops."
    )


class NpuRuntime(Adapter):
    """Import ``torch_npu`` and set its operator-format and compile-mode flags."""

    name: ClassVar[str] = "npu_runtime"
    devices: ClassVar[Tuple[str, ...]] = ("npu",)
    phase: ClassVar[Phase] = Phase.RUNTIME

    def __init__(self, *, allow_internal_format: bool = True, jit_compile: bool = False) -> None:
        self.allow_internal_format = allow_internal_format
        self.jit_compile = jit_compile

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if not torch_npu_installed():
            return False, "torch_npu is not installed"
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        npu = import_torch_npu().npu
        npu.config.allow_internal_format = self.allow_internal_format
        npu.set_compile_mode(jit_compile=self.jit_compile)
        return AdapterResult.applied(
            f"import torch_npu; allow_internal_format={self.allow_internal_format}; "
            f"set_compile_mode(jit_compile={self.jit_compile})"
        )


def make_npu_fusion_attention(torch_npu: Any) -> Callable[..., torch.Tensor]:
    """An attention backend (see ``streampetr_plugin.models.layers.attention``) on ``torch_npu``'s kernel.

    The backend contract gives ``q`` (B, heads, L, D), ``k``/``v`` (B, heads, S, D) and a boolean mask
    with True = blocked. The kernel takes the BSND layout, which is exactly the memory layout our
    multi-head attention splits heads from (the transposes below are views), and a boolean
    ``atten_mask`` with True = masked in SS, 11SS, B1SS or BNSS shape.
    """

    def npu_fusion_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: Optional[torch.Tensor],
        dropout_p: float,
        training: bool,
    ) -> torch.Tensor:
        heads, head_dim = q.shape[1], q.shape[-1]
        mask = attn_mask
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # (B, L, S) -> (B, 1, L, S)
        out = torch_npu.npu_fusion_attention(
            q.transpose(1, 2).contiguous(),  # (B, L, heads, D)
            k.transpose(1, 2).contiguous(),
            v.transpose(1, 2).contiguous(),
            heads,
            input_layout="BSND",
            atten_mask=mask,
            scale=head_dim**-0.5,
            keep_prob=1.0 - dropout_p if training else 1.0,
            pre_tockens=_NO_TOKEN_WINDOW,
            next_tockens=_NO_TOKEN_WINDOW,
            sparse_mode=0,
        )[0]
        return out.transpose(1, 2)  # (B, heads, L, D)

    return npu_fusion_attention


def _attention_modules(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    from streampetr_plugin.models.layers.multihead_attention import MultiheadAttentionCore

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiheadAttentionCore)]


class NpuFusionAttentionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replace: List[str] = Field(
        default_factory=lambda: ["sdpa"], description="Attention backends that the fused kernel replaces."
    )


class NpuFusionAttention(Adapter):
    """Select the ``npu_fusion_attention`` attention backend on the model's attention modules."""

    name: ClassVar[str] = NPU_ATTENTION_BACKEND
    devices: ClassVar[Tuple[str, ...]] = ("npu",)
    phase: ClassVar[Phase] = Phase.MODEL

    def __init__(self, *, replace: Optional[List[str]] = None) -> None:
        self.replace = list(replace if replace is not None else ["sdpa"])

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if not torch_npu_installed():
            return False, "torch_npu is not installed"
        if not hasattr(import_torch_npu(), "npu_fusion_attention"):
            return False, "this torch_npu has no npu_fusion_attention"
        if context.model is None:
            return False, "no model in the context"
        if context.registries is None or NPU_ATTENTION_BACKEND not in context.registries.attention_backends:
            return False, f"no {NPU_ATTENTION_BACKEND} entry in the attention_backends registry"
        modules = [(n, m) for n, m in _attention_modules(context.model) if m.backend in self.replace]
        if not modules:
            return False, f"no attention module uses {' or '.join(self.replace)}"
        odd = [n for n, m in modules if (m.embed_dims // m.num_heads) % 16]
        if odd:
            where = f"{odd[0]} and {len(odd) - 1} more"
            return False, f"the kernel needs head sizes that are multiples of 16 ({where})"
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        attend = context.registries.attention_backends.build(NPU_ATTENTION_BACKEND, {})
        modules = [m for _, m in _attention_modules(context.model) if m.backend in self.replace]
        for module in modules:
            module.use_backend(NPU_ATTENTION_BACKEND, attend)
        return AdapterResult.applied(
            f"{len(modules)} attention modules use {NPU_ATTENTION_BACKEND} (BSND, boolean mask True = masked)"
        )


def _probe_optimizer(optimizer_class: type, device: torch.device) -> None:
    """Construct ``optimizer_class`` on a one-element parameter: raises what a real build would raise."""
    optimizer_class([torch.nn.Parameter(torch.zeros(1, device=device))], lr=1e-3)


def _optimizer_candidates() -> List[Tuple[str, Callable[[], type]]]:
    def mindspeed_adamw() -> type:
        if importlib.util.find_spec("mindspeed") is None:
            raise ImportError("mindspeed is not installed")
        return importlib.import_module("mindspeed.optimizer.adamw").AdamW

    def npu_fused_adamw() -> type:
        optim = importlib.import_module("torch_npu.optim")
        if not hasattr(optim, "NpuFusedAdamW"):
            raise ImportError("torch_npu.optim has no NpuFusedAdamW")
        return optim.NpuFusedAdamW

    return [
        ("mindspeed.optimizer.adamw.AdamW", mindspeed_adamw),
        ("torch_npu.optim.NpuFusedAdamW", npu_fused_adamw),
    ]


class NpuFusedAdamW(Adapter):
    """Hand the AdamW factory a fused NPU optimiser: MindSpeed's, else torch_npu's, else torch's."""

    name: ClassVar[str] = "npu_fused_adamw"
    devices: ClassVar[Tuple[str, ...]] = ("npu",)
    phase: ClassVar[Phase] = Phase.OPTIMIZER

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        return context.adamw_left_to_adapters()

    def apply(self, context: AdapterContext) -> AdapterResult:
        device = next(context.model.parameters()).device if context.model is not None else torch.device("cpu")
        refused = []
        for label, load in _optimizer_candidates():
            try:
                optimizer_class = load()
                _probe_optimizer(optimizer_class, device)
            except Exception as error:  # missing package, or a class that cannot run outside its framework
                refused.append(f"{label}: {type(error).__name__}: {error}")
                continue
            context.optimizer_class = optimizer_class
            suffix = f" (not used: {'; '.join(refused)})" if refused else ""
            return AdapterResult.applied(f"{label}{suffix}")
        return AdapterResult.skipped(f"torch.optim.AdamW, no fused optimiser usable: {'; '.join(refused)}")
