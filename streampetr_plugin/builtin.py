"""The built-in plugin: registers StreamPETR's own components through the public hooks.

Imports happen inside the hooks so that ``import streampetr_plugin`` stays light.
"""
from __future__ import annotations

from typing import Any, Dict, List

from streampetr_plugin.hookspecs import Register, hookimpl
from streampetr_plugin.models.backbones.contract import ShapeSpec


@hookimpl
def streampetr_register_backbones(register: Register) -> None:
    from streampetr_plugin.models.backbones.resnet import ResNet, ResNetParams
    from streampetr_plugin.models.backbones.vovnet import VoVNet, VoVNetParams

    register("vovnet", VoVNet, params=VoVNetParams)
    register("resnet", ResNet, params=ResNetParams)


def _build_cpfpn(*, input_shape: Dict[str, ShapeSpec], **options: Any):
    from streampetr_plugin.models.necks.cp_fpn import CPFPN

    return CPFPN(in_channels=[spec.channels for spec in input_shape.values()], **options)


@hookimpl
def streampetr_register_necks(register: Register) -> None:
    from streampetr_plugin.models.necks.cp_fpn import CPFPNParams

    register("cpfpn", _build_cpfpn, params=CPFPNParams)


def _build_focal_head(*, input_shape: ShapeSpec, num_classes: int, **options: Any):
    from streampetr_plugin.models.heads.focal_head import FocalHead

    return FocalHead(in_channels=input_shape.channels, num_classes=num_classes, **options)


def _build_streampetr_head(*, input_shape: ShapeSpec, num_classes: int, **options: Any):
    from streampetr_plugin.models.heads.streampetr_head import StreamPETRHead

    return StreamPETRHead(in_channels=input_shape.channels, num_classes=num_classes, **options)


@hookimpl
def streampetr_register_heads(register: Register) -> None:
    from streampetr_plugin.models.heads.focal_head import FocalHeadParams
    from streampetr_plugin.models.heads.streampetr_head import StreamPETRHeadParams

    register("focal_head", _build_focal_head, params=FocalHeadParams)
    register("streampetr", _build_streampetr_head, params=StreamPETRHeadParams)


@hookimpl
def streampetr_register_detectors(register: Register) -> None:
    from streampetr_plugin.models.detector import StreamPETRDetector, StreamPETRDetectorParams

    register("streampetr", StreamPETRDetector, params=StreamPETRDetectorParams)


def _build_nuscenes(*, training: bool, classes: List[str], **options: Any):
    from streampetr_plugin.data.dataset import NuScenesStreamDataset

    return NuScenesStreamDataset(training=training, classes=classes, **options)


@hookimpl
def streampetr_register_datasets(register: Register) -> None:
    from streampetr_plugin.data.dataset import NuScenesDatasetParams

    register("nuscenes", _build_nuscenes, params=NuScenesDatasetParams)


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
    from streampetr_plugin.training.lr_schedule import CosineWarmupParams, build_cosine_warmup

    register("cosine_warmup", build_cosine_warmup, params=CosineWarmupParams)


@hookimpl
def streampetr_register_adapters(register: Register) -> None:
    from streampetr_plugin.adapters import ascend, capture, common, cpu, cuda
    from streampetr_plugin.adapters.base import NoOptions

    register(ascend.NpuEnvironment.name, ascend.NpuEnvironment, params=ascend.NpuEnvironmentParams)
    register(ascend.NpuRuntime.name, ascend.NpuRuntime, params=ascend.NpuRuntimeParams)
    register(
        ascend.NpuFusionAttention.name, ascend.NpuFusionAttention, params=ascend.NpuFusionAttentionParams
    )
    register(ascend.NpuFusedAdamW.name, ascend.NpuFusedAdamW, params=NoOptions)
    register(cuda.CudaAllocator.name, cuda.CudaAllocator, params=NoOptions)
    register(cuda.CudaTf32.name, cuda.CudaTf32, params=cuda.CudaTf32Params)
    register(cuda.CudaSdpaKernels.name, cuda.CudaSdpaKernels, params=NoOptions)
    register(cuda.CudaChannelsLast.name, cuda.CudaChannelsLast, params=NoOptions)
    register(cuda.CudaFusedAdamW.name, cuda.CudaFusedAdamW, params=NoOptions)
    register(cpu.CpuThreads.name, cpu.CpuThreads, params=cpu.CpuThreadsParams)
    register(cpu.CpuForeachAdamW.name, cpu.CpuForeachAdamW, params=NoOptions)
    register(cpu.CpuGlibcMalloc.name, cpu.CpuGlibcMalloc, params=cpu.CpuGlibcMallocParams)
    register(cpu.CpuChannelsLast.name, cpu.CpuChannelsLast, params=NoOptions)
    register(capture.GraphCapture.name, capture.GraphCapture, params=capture.GraphCaptureParams)
    register(capture.NpuGraphCapture.name, capture.NpuGraphCapture, params=capture.NpuGraphCaptureParams)
    register(common.DdpStaticGraph.name, common.DdpStaticGraph, params=NoOptions)
    register(common.FoldBatchNorm.name, common.FoldBatchNorm, params=NoOptions)
    register(common.GradientCheckpointing.name, common.GradientCheckpointing,
             params=common.GradientCheckpointingParams)


def _build_centerpoint_tracker(**options: Any):
    from streampetr_plugin.tracking.centerpoint import CenterPointTracker, CenterPointTrackerParams

    return CenterPointTracker(CenterPointTrackerParams(**options))


def _build_query_propagation_tracker(**options: Any):
    from streampetr_plugin.tracking.query_propagation import (
        QueryPropagationTracker,
        QueryPropagationTrackerParams,
    )

    return QueryPropagationTracker(QueryPropagationTrackerParams(**options))


@hookimpl
def streampetr_register_trackers(register: Register) -> None:
    from streampetr_plugin.tracking.centerpoint import CenterPointTrackerParams
    from streampetr_plugin.tracking.query_propagation import QueryPropagationTrackerParams

    register("centerpoint", _build_centerpoint_tracker, params=CenterPointTrackerParams)
    register("query_propagation", _build_query_propagation_tracker, params=QueryPropagationTrackerParams)
