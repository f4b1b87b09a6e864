"""The built-in plugin: registers StreamPETR's own components through the public hooks.

Every component with options is registered with its params model; its factory here receives the
validated instance and hands it to the component's constructor (model components take it whole; the
others still take its fields as keyword arguments), together with the sizes taken from the modules
built before it.
Imports happen inside the hooks so that creating a plugin host stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

from streampetr_plugin.hookspecs import Register, hookimpl
from streampetr_plugin.models.backbones.contract import ShapeSpec
from streampetr_plugin.registry import NoOptions

if TYPE_CHECKING:
    from pydantic import BaseModel


def _keyword_factory(component: Callable[..., Any]) -> Callable[..., Any]:
    """A factory building ``component(**fields of params, **context)``, documented as the component."""

    def factory(params: "BaseModel", **context: Any) -> Any:
        return component(**dict(params), **context)

    factory.__doc__ = component.__doc__
    return factory


@hookimpl
def streampetr_register_backbones(register: Register) -> None:
    from streampetr_plugin.models.backbones.resnet import ResNet, ResNetParams
    from streampetr_plugin.models.backbones.vovnet import VoVNet, VoVNetParams

    register("vovnet", VoVNet, params=VoVNetParams)
    register("resnet", ResNet, params=ResNetParams)


def _build_cpfpn(params: "BaseModel", *, input_shape: Dict[str, ShapeSpec]) -> Any:
    from streampetr_plugin.models.necks.cp_fpn import CPFPN

    return CPFPN(params, in_channels=[spec.channels for spec in input_shape.values()])


@hookimpl
def streampetr_register_necks(register: Register) -> None:
    from streampetr_plugin.models.necks.cp_fpn import CPFPNParams

    register("cpfpn", _build_cpfpn, params=CPFPNParams)


def _build_focal_head(params: "BaseModel", *, input_shape: ShapeSpec, num_classes: int) -> Any:
    from streampetr_plugin.models.heads.focal_head import FocalHead

    return FocalHead(
        params, in_channels=input_shape.channels, num_classes=num_classes, stride=input_shape.stride
    )


def _build_streampetr_head(params: "BaseModel", *, input_shape: ShapeSpec, num_classes: int) -> Any:
    from streampetr_plugin.models.heads.streampetr_head import StreamPETRHead

    return StreamPETRHead(params, in_channels=input_shape.channels, num_classes=num_classes)


@hookimpl
def streampetr_register_heads(register: Register) -> None:
    from streampetr_plugin.models.heads.focal_head import FocalHeadParams
    from streampetr_plugin.models.heads.streampetr_head import StreamPETRHeadParams

    register("focal_head", _build_focal_head, params=FocalHeadParams)
    register("streampetr", _build_streampetr_head, params=StreamPETRHeadParams)


def _build_streampetr_detector(params: "BaseModel", *, input_shape: ShapeSpec, **modules: Any) -> Any:
    from streampetr_plugin.models.detector import StreamPETRDetector

    return StreamPETRDetector(params, stride=input_shape.stride, **modules)


@hookimpl
def streampetr_register_detectors(register: Register) -> None:
    from streampetr_plugin.models.detector import StreamPETRDetectorParams

    register("streampetr", _build_streampetr_detector, params=StreamPETRDetectorParams)


@hookimpl
def streampetr_register_datasets(register: Register) -> None:
    from streampetr_plugin.data.dataset import NuScenesDatasetParams, NuScenesStreamDataset

    register("nuscenes", _keyword_factory(NuScenesStreamDataset), params=NuScenesDatasetParams)


@hookimpl
def streampetr_register_losses(register: Register) -> None:
    from streampetr_plugin.models.losses.focal_loss import FocalLoss
    from streampetr_plugin.models.losses.gaussian_focal_loss import GaussianFocalLoss
    from streampetr_plugin.models.losses.giou_loss import GIoULoss
    from streampetr_plugin.models.losses.l1_loss import L1Loss
    from streampetr_plugin.models.losses.quality_focal_loss import QualityFocalLoss

    for name, loss in (
        ("focal", FocalLoss),
        ("l1", L1Loss),
        ("giou", GIoULoss),
        ("quality_focal", QualityFocalLoss),
        ("gaussian_focal", GaussianFocalLoss),
    ):
        register(name, loss)


@hookimpl
def streampetr_register_optimizers(register: Register) -> None:
    from streampetr_plugin.training.optimizers import AdamWParams, build_adamw

    register("adamw", build_adamw, params=AdamWParams)


@hookimpl
def streampetr_register_lr_schedulers(register: Register) -> None:
    from streampetr_plugin.training.lr_schedule import CosineWarmup, CosineWarmupParams

    register("cosine_warmup", _keyword_factory(CosineWarmup), params=CosineWarmupParams)


@hookimpl
def streampetr_register_adapters(register: Register) -> None:
    from streampetr_plugin.adapters import ascend, capture, common, cpu, cuda

    for adapter, params in (
        (ascend.NpuEnvironment, ascend.NpuEnvironmentParams),
        (ascend.NpuRuntime, ascend.NpuRuntimeParams),
        (ascend.NpuFusionAttention, ascend.NpuFusionAttentionParams),
        (ascend.NpuFusedAdamW, NoOptions),
        (cuda.CudaAllocator, NoOptions),
        (cuda.CudaTf32, cuda.CudaTf32Params),
        (cuda.CudaSdpaKernels, NoOptions),
        (cuda.CudaChannelsLast, NoOptions),
        (cuda.CudaFusedAdamW, NoOptions),
        (cpu.CpuThreads, cpu.CpuThreadsParams),
        (cpu.CpuForeachAdamW, NoOptions),
        (cpu.CpuGlibcMalloc, cpu.CpuGlibcMallocParams),
        (cpu.CpuChannelsLast, NoOptions),
        (capture.GraphCapture, capture.GraphCaptureParams),
        (capture.InferenceGraphCapture, capture.InferenceGraphCaptureParams),
        (capture.NpuGraphCapture, capture.NpuGraphCaptureParams),
        (common.DdpStaticGraph, NoOptions),
        (common.FoldBatchNorm, NoOptions),
        (common.GradientCheckpointing, common.GradientCheckpointingParams),
    ):
        register(adapter.name, _keyword_factory(adapter), params=params)


def _build_centerpoint_tracker(params: "BaseModel") -> Any:
    from streampetr_plugin.tracking.centerpoint import CenterPointTracker

    return CenterPointTracker(params)


def _build_query_propagation_tracker(params: "BaseModel") -> Any:
    from streampetr_plugin.tracking.query_propagation import QueryPropagationTracker

    return QueryPropagationTracker(params)


@hookimpl
def streampetr_register_trackers(register: Register) -> None:
    from streampetr_plugin.tracking.centerpoint import CenterPointTrackerParams
    from streampetr_plugin.tracking.query_propagation import QueryPropagationTrackerParams

    register("centerpoint", _build_centerpoint_tracker, params=CenterPointTrackerParams)
    register("query_propagation", _build_query_propagation_tracker, params=QueryPropagationTrackerParams)


def _sdpa() -> Callable[..., Any]:
    """PyTorch's fused ``scaled_dot_product_attention`` (the default)."""
    from streampetr_plugin.models.layers.attention import sdpa_attention

    return sdpa_attention


def _math() -> Callable[..., Any]:
    """An explicit softmax (the numerical reference)."""
    from streampetr_plugin.models.layers.attention import math_attention

    return math_attention


def _npu_fusion_attention() -> Callable[..., Any]:
    """Ascend's fused attention kernel (``torch_npu.npu_fusion_attention``, BSND layout); imports
    ``torch_npu`` when it is first selected."""
    from streampetr_plugin.adapters.ascend import make_npu_fusion_attention
    from streampetr_plugin.adapters.device import import_torch_npu

    return make_npu_fusion_attention(import_torch_npu())


@hookimpl
def streampetr_register_attention_backends(register: Register) -> None:
    from streampetr_plugin.adapters.ascend import NPU_ATTENTION_BACKEND

    for name, kernel in (("sdpa", _sdpa), ("math", _math), (NPU_ATTENTION_BACKEND, _npu_fusion_attention)):
        register(name, _keyword_factory(kernel), params=NoOptions)

