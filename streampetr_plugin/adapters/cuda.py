"""NVIDIA GPU adapters.

* ``cuda_allocator``: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless exported (read when
  the caching allocator starts, so set before the first allocation);
* ``cuda_tf32``: TF32 matmuls and convolutions (what the reference's PyTorch versions did by default);
* ``cuda_sdpa_kernels``: keep SDPA's flash and memory-efficient kernels on for the model's attention;
* ``cuda_channels_last``: the image backbone in channels-last memory format (off by default);
* ``cuda_fused_adamw``: ``torch.optim.AdamW(fused=True)`` through the AdamW factory.

NCCL is the CUDA process-group backend (:data:`streampetr_plugin.adapters.device.DISTRIBUTED_BACKENDS`).
"""
from __future__ import annotations

from typing import ClassVar, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin.adapters.base import Adapter, AdapterContext, AdapterResult, Phase

CUDA_ALLOC_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


class _CudaAdapter(Adapter):
    devices: ClassVar[Tuple[str, ...]] = ("cuda",)

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""


class CudaAllocator(_CudaAdapter):
    """Expandable allocator segments (less fragmentation with varying GT counts)."""

    name: ClassVar[str] = "cuda_allocator"
    phase: ClassVar[Phase] = Phase.ENVIRONMENT

    def apply(self, context: AdapterContext) -> AdapterResult:
        key, value = CUDA_ALLOC_CONF
        if key in context.environ:
            return AdapterResult.skipped(f"kept the exported {key}={context.environ[key]}")
        context.environ[key] = value
        return AdapterResult.applied(f"set {key}={value}")


class CudaTf32Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    matmul: bool = Field(True, description="torch.backends.cuda.matmul.allow_tf32.")
    cudnn: bool = Field(True, description="torch.backends.cudnn.allow_tf32 (convolutions).")


class CudaTf32(_CudaAdapter):
    """TF32 tensor cores for float32 matmuls and convolutions."""

    name: ClassVar[str] = "cuda_tf32"
    phase: ClassVar[Phase] = Phase.RUNTIME

    def __init__(self, *, matmul: bool = True, cudnn: bool = True) -> None:
        self.matmul = matmul
        self.cudnn = cudnn

    def apply(self, context: AdapterContext) -> AdapterResult:
        torch.backends.cuda.matmul.allow_tf32 = self.matmul
        torch.backends.cudnn.allow_tf32 = self.cudnn
        return AdapterResult.applied(f"allow_tf32: matmul={self.matmul}, cudnn={self.cudnn}")


class CudaSdpaKernels(_CudaAdapter):
    """Flash and memory-efficient SDPA kernels for the model's ``sdpa`` attention backend."""

    name: ClassVar[str] = "cuda_sdpa_kernels"
    phase: ClassVar[Phase] = Phase.MODEL

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        ok, reason = super().precheck(context)
        if not ok:
            return ok, reason
        from streampetr_plugin.models.layers.multihead_attention import MultiheadAttentionCore

        uses_sdpa = any(
            isinstance(m, MultiheadAttentionCore) and m.backend == "sdpa" for m in context.model.modules()
        )
        return (True, "") if uses_sdpa else (False, "no attention module uses the sdpa backend")

    def apply(self, context: AdapterContext) -> AdapterResult:
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        return AdapterResult.applied("flash (fp16/bf16 inputs) and memory-efficient SDPA kernels enabled")


class CudaChannelsLast(_CudaAdapter):
    """The image backbone's weights in channels-last layout (convolution-heavy speed-up on tensor cores)."""

    name: ClassVar[str] = "cuda_channels_last"
    phase: ClassVar[Phase] = Phase.MODEL
    enabled_by_default: ClassVar[bool] = False

    def apply(self, context: AdapterContext) -> AdapterResult:
        backbone = getattr(context.model, "img_backbone", None)
        if backbone is None:
            return AdapterResult.skipped("the model has no img_backbone")
        backbone.to(memory_format=torch.channels_last)
        return AdapterResult.applied("img_backbone in channels_last")


class CudaFusedAdamW(_CudaAdapter):
    """``torch.optim.AdamW(fused=True)``: one kernel for the whole update."""

    name: ClassVar[str] = "cuda_fused_adamw"
    phase: ClassVar[Phase] = Phase.OPTIMIZER

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        ok, reason = super().precheck(context)
        if not ok:
            return ok, reason
        return context.adamw_left_to_adapters()

    def apply(self, context: AdapterContext) -> AdapterResult:
        context.optimizer_options["implementation"] = "fused"
        return AdapterResult.applied("torch.optim.AdamW(fused=True)")
