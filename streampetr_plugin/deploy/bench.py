"""Streaming inference configurations timed alternately on the same frames.

``streampetr bench RECIPE --inference --backend onnxruntime`` lands here: the recipe's detector (initial
weights) is exported to a temporary graph, and one synthetic stream of the recipe's test shapes
(:mod:`streampetr_plugin.bench.synthetic_batch`, batch 1) runs through the PyTorch eval path and through
onnxruntime at each graph optimisation level. Every frame goes through every configuration in turn, so
a change in the machine's load falls on all of them alike. onnxruntime gets as many threads as PyTorch.

``--backend torch-cpu-levers`` compares, the same way, the PyTorch eval path as built with its CPU
levers (:data:`CPU_LEVERS`): BatchNorm folded into the convolutions, the image backbone in channels-last
layout, both, and folded with the image backbone and neck compiled by inductor with frozen weights (the
``inference_graph_capture`` adapter), without and with channels-last (left out where inductor finds no
C++ compiler). The warm-up frames
take the compilation.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from streampetr_plugin.adapters.capture import DEFAULT_TARGETS, capture_modules, cpp_compiler
from streampetr_plugin.bench.report import StepTimes
from streampetr_plugin.bench.synthetic_batch import SyntheticStreams, stream_shape
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.deploy.export import export_graph, load_detector, recipe_test_shape
from streampetr_plugin.deploy.onnx_runner import ONNX_FILE, OnnxStreamRunner
from streampetr_plugin.models.batchnorm_folding import fold_batchnorm
from streampetr_plugin.models.detector import StreamPETRDetector
from streampetr_plugin.plugins import PluginHost
from streampetr_plugin.training.precision import cpu_has_native_bf16

DEFAULT_LEVELS = ("disable", "basic", "all")


@dataclass(frozen=True)
class CpuLever:
    """One configuration of ``streampetr bench --inference --backend torch-cpu-levers``: BatchNorm folded,
    the image backbone in channels-last layout, backbone and neck compiled by inductor with frozen weights,
    backbone and neck under bf16 autocast (the heads stay float32, as ``optimization.amp.cpu=bf16``)."""

    name: str
    fold: bool = False
    channels_last: bool = False
    capture: bool = False
    bf16: bool = False


CPU_LEVERS = (
    CpuLever("torch BN folded", fold=True),
    CpuLever("torch channels-last", channels_last=True),
    CpuLever("torch BN folded + channels-last", fold=True, channels_last=True),
    CpuLever("torch BN folded + inductor, frozen", fold=True, capture=True),
    CpuLever("torch BN folded + channels-last + inductor, frozen", fold=True, channels_last=True, capture=True),
    CpuLever("torch BN folded + bf16", fold=True, bf16=True),
    CpuLever("torch BN folded + channels-last + bf16", fold=True, channels_last=True, bf16=True),
    CpuLever("torch BN folded + channels-last + inductor, frozen + bf16", fold=True, channels_last=True,
             capture=True, bf16=True),
)


@dataclass
class BackendTiming:
    """One configuration: seconds per frame (``step_time_s``), frames per second at the median and the
    median process CPU seconds per frame (all threads)."""

    name: str
    step_time_s: StepTimes
    frames_per_s: float
    cpu_s_per_frame: float


@dataclass
class BackendComparison:
    """Every configuration's timing, the threads each backend used and the export's wall seconds (None
    when the graph was given)."""

    threads: int
    export_s: Optional[float]
    timings: List[BackendTiming]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def bench_backends(
    recipe: Recipe, host: PluginHost, *, steps: int, warmup: int, levels: Sequence[str] = DEFAULT_LEVELS
) -> BackendComparison:
    """Export the recipe's detector (initial weights) to a temporary graph and :func:`time_backends`."""
    detector = load_detector(recipe, host, None, exporting=True)
    num_cameras, image_hw = recipe_test_shape(recipe)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        export_graph(detector, Path(directory) / ONNX_FILE, num_cameras=num_cameras, image_hw=image_hw)
        export_s = time.perf_counter() - start
        return time_backends(
            recipe, detector, Path(directory), steps=steps, warmup=warmup, levels=levels, export_s=export_s
        )


def time_backends(
    recipe: Recipe,
    detector: StreamPETRDetector,
    onnx_path: Path,
    *,
    steps: int,
    warmup: int,
    levels: Sequence[str] = DEFAULT_LEVELS,
    export_s: Optional[float] = None,
) -> BackendComparison:
    """Time ``steps`` frames (after ``warmup``) of ``detector`` in PyTorch and of its graph ``onnx_path``
    in onnxruntime at ``levels``, on one synthetic stream of the recipe's test shapes."""
    threads = torch.get_num_threads()
    configurations: Dict[str, Callable[[Mapping[str, Any]], Any]] = {"torch eager": detector.infer}
    nms_radius = detector.pts_bbox_head.bbox_coder.nms_radius
    for level in levels:
        configurations[f"onnxruntime {level}"] = OnnxStreamRunner(
            onnx_path, threads=threads, optimization=level, nms_radius=nms_radius
        ).step
    timings = alternate(configurations, synthetic_test_frames(recipe, warmup + steps), warmup=warmup)
    return BackendComparison(threads=threads, export_s=export_s, timings=timings)


def bench_cpu_levers(recipe: Recipe, host: PluginHost, *, steps: int, warmup: int) -> BackendComparison:
    """The PyTorch eval path of the recipe's detector (initial weights) as built and with the levers of
    :data:`CPU_LEVERS`."""
    built = load_detector(recipe, host, None, inference_adapters=False)
    configurations: Dict[str, Callable[[Mapping[str, Any]], Any]] = {"torch as built": built.infer}
    compiler, _ = cpp_compiler()
    for lever in CPU_LEVERS:
        if (lever.capture and compiler is None) or (lever.bf16 and not cpu_has_native_bf16()):
            continue
        detector = copy.deepcopy(built)
        if lever.fold:
            fold_batchnorm(detector)
        if lever.channels_last:
            detector.img_backbone.to(memory_format=torch.channels_last)
        if lever.capture:
            capture_modules(detector, DEFAULT_TARGETS, backend="inductor", options={"freezing": True})
        configurations[lever.name] = _in_bf16(detector.infer) if lever.bf16 else detector.infer
    timings = alternate(configurations, synthetic_test_frames(recipe, warmup + steps), warmup=warmup)
    return BackendComparison(threads=torch.get_num_threads(), export_s=None, timings=timings)


def _in_bf16(infer: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    """``infer`` under CPU bf16 autocast (the detector keeps its heads in float32 itself)."""

    def infer_in_bf16(batch: Mapping[str, Any]) -> Any:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return infer(batch)

    return infer_in_bf16


def synthetic_test_frames(recipe: Recipe, count: int) -> List[Dict[str, Any]]:
    """``count`` frames of one synthetic stream (batch 1) of the recipe's test shapes, on the CPU."""
    streams = SyntheticStreams(
        dataclasses.replace(stream_shape(recipe, training=False), batch_size=1),
        with_targets=False,
        seed=recipe.runtime.seed,
    )
    return [streams.frame(index, torch.device("cpu")) for index in range(count)]


def alternate(
    configurations: Mapping[str, Callable[[Mapping[str, Any]], Any]],
    frames: Sequence[Mapping[str, Any]],
    *,
    warmup: int,
) -> List[BackendTiming]:
    """Every frame through every configuration in turn; the frames after the first ``warmup`` timed."""
    wall: Dict[str, List[float]] = {name: [] for name in configurations}
    cpu: Dict[str, List[float]] = {name: [] for name in configurations}
    with torch.no_grad():
        for index, batch in enumerate(frames):
            for name, step in configurations.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                step(batch)
                if index >= warmup:
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
    timings = []
    for name in configurations:
        step_time = StepTimes.from_times(wall[name])
        timings.append(
            BackendTiming(
                name=name,
                step_time_s=step_time,
                frames_per_s=1.0 / step_time.median,
                cpu_s_per_frame=statistics.median(cpu[name]),
            )
        )
    return timings
