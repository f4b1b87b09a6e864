"""Mixed precision as the reference trains: fp16 autocast with a dynamic loss scale on NPU and CUDA.

The reference (mmcv ``Fp16OptimizerHook``, PyTorch >= 1.6 path) keeps the weights in fp32, runs the
backbone and neck under autocast and everything else in fp32, and scales the loss with a
``GradScaler`` (initial scale 2^16, doubled after 2000 finite steps, halved on overflow). The
detector owns the scope: it disables autocast around its heads unless ``head_autocast`` is set, so
``scope: backbone_neck`` autocasts the whole forward and ``scope: full`` also sets ``head_autocast``.
bf16 needs no loss scale. The CPU runs fp32 unless ``amp.cpu`` asks for bf16 (the same scope, no loss
scale): oneDNN's bf16 convolutions take about half the time of fp32 ones on CPUs with native bf16 dot
products, and the heads, whose geometry bf16 would coarsen, stay in fp32 as on an accelerator.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager, Optional

import torch
from torch import nn

from streampetr_plugin.adapters.device import DeviceHandle, import_torch_npu
from streampetr_plugin.config.schema import AmpConfig

logger = logging.getLogger(__name__)

# The recipe's names of the autocast dtypes.
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions and matmuls in hardware on this CPU (AVX512_BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _grad_scaler(device_kind: str, **kwargs: Any) -> Any:
    try:
        return torch.amp.GradScaler(device_kind, **kwargs)
    except (AttributeError, RuntimeError, TypeError):
        if device_kind != "npu":
            raise
        # torch < 2.3 has no device-generic scaler; torch_npu ships its own.
        return import_torch_npu().npu.amp.GradScaler(**kwargs)


class MixedPrecision:
    """Autocast context and loss scaler for one device, from the recipe's ``optimization.amp``.

    Attributes:
        dtype: the autocast dtype, or None for fp32.
        scaler: a ``GradScaler`` for fp16, else None.
        fixed_scale: the constant loss scale when ``loss_scale`` is a number.
    """

    def __init__(self, amp: AmpConfig, device: DeviceHandle) -> None:
        self.device_kind = device.kind
        self.scope = amp.scope
        self.dtype: Optional[torch.dtype] = None
        self.scaler: Any = None
        self.fixed_scale: Optional[float] = None
        if not amp.enabled:
            return
        if device.kind == "cpu":
            if amp.cpu == "bf16":
                self.dtype = torch.bfloat16
                if not cpu_has_native_bf16():
                    logger.warning(
                        "optimization.amp.cpu is bf16 but this CPU has no native bf16 (AVX512_BF16 or AMX): "
                        "oneDNN emulates it, slower than fp32; set optimization.amp.cpu=fp32"
                    )
            return
        self.dtype = AUTOCAST_DTYPES[amp.dtype]
        if self.dtype is not torch.float16:
            return
        if amp.loss_scale == "dynamic":
            self.scaler = _grad_scaler(
                device.kind, init_scale=amp.init_scale, growth_interval=amp.growth_interval
            )
        else:
            self.fixed_scale = float(amp.loss_scale)
            self.scaler = _grad_scaler(device.kind, init_scale=self.fixed_scale)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> ContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_kind, dtype=self.dtype)

    def configure_model(self, model: nn.Module) -> None:
        """Apply the scope: ``full`` lets the detector's heads run under autocast too."""
        if self.dtype is None or not hasattr(model, "head_autocast"):
            return
        if self.scope == "full":
            model.head_autocast = True
        elif model.head_autocast:
            logger.warning("amp.scope is backbone_neck but the model sets head_autocast: heads autocast too")

    def loss_scale(self) -> Optional[float]:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def update(self) -> None:
        """After the (possibly skipped) optimiser step: adapt the dynamic scale, or restore the fixed one."""
        if self.scaler is None:
            return
        if self.fixed_scale is None:
            self.scaler.update()
        else:
            self.scaler.update(self.fixed_scale)

    def describe(self) -> str:
        if self.dtype is None:
            return "fp32" + (" (optimization.amp.cpu=bf16 for bf16 autocast)" if self.device_kind == "cpu" else "")
        scope = "whole model" if self.scope == "full" else "backbone and neck"
        name = "fp16" if self.dtype is torch.float16 else "bf16"
        if self.scaler is None:
            return f"{name} autocast on the {scope}"
        scale = "dynamic" if self.fixed_scale is None else f"fixed {self.fixed_scale:g}"
        return f"{name} autocast on the {scope}, {scale} loss scale (initial {self.loss_scale():g})"
