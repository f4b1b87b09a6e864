"""``streampetr infer``: run a checkpoint over a dataset split in stream order, write nuScenes results.

Usage: ``streampetr infer RECIPE [a.b=v ...] --checkpoint PATH [--backend torch|onnxruntime] [--onnx DIR]
[--split val|train] [--out DIR] [--pictures N] [--threads N] [--tasks detection tracking]``.

Every frame of the split goes through one stream in timestamp order (a new scene restarts it), with
the PyTorch eval path (``torch``) or an exported graph in onnxruntime (``onnxruntime``, the graph from
``--onnx``, as written by ``streampetr export``). Writes to ``--out`` (default
``<work_dir>/infer/<backend>``) ``results_nusc.json`` (the nuScenes detection submission format, what
the official metric and the leaderboard take; ``--tasks detection``, the default), with ``--tasks
tracking`` ``results_nusc_tracking.json`` (the recipe's tracker over the split, in the nuScenes tracking
submission format, docs/tracking.md), ``predictions.npz`` (what ``streampetr visualize`` reads) and, with
``--pictures N``, the cameras and bird's-eye view of the first N samples; prints the frames per second
of the model alone and of the whole loop.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.deploy.options import BACKENDS
from streampetr_plugin.deploy.streams import split_dataset, stream_batches
from streampetr_plugin.errors import InputError, describe
from streampetr_plugin.plugins import PluginHost, Registries

RESULTS_FILE = "results_nusc.json"

Detections = Dict[str, np.ndarray]


@dataclass
class InferResult:
    """What :func:`infer_command` wrote (``results_path`` and ``tracking_results_path``, None for a task
    not run; ``predictions_path``, ``pictures``) and how fast it ran: ``frames``, ``model_seconds`` (the
    model's steps only) and ``total_seconds`` (the loop, data loading included)."""

    results_path: Optional[Path]
    tracking_results_path: Optional[Path]
    predictions_path: Path
    pictures: List[Path]
    frames: int
    model_seconds: float
    total_seconds: float

    @property
    def model_fps(self) -> float:
        return self.frames / self.model_seconds

    @property
    def total_fps(self) -> float:
        return self.frames / self.total_seconds


def recipe_threads(recipe: Recipe) -> Optional[int]:
    """The CPU threads the recipe asks for (``accelerator.adapters.cpu_threads.num_threads``), if any."""
    switch = recipe.accelerator.adapters.get("cpu_threads")
    if switch is None or not switch.enabled:
        return None
    threads = switch.options().get("num_threads")
    return None if threads is None else int(threads)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run with ``threads`` PyTorch threads (None: as they are); yields the count in effect."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _torch_step(
    recipe: Recipe, host: PluginHost, checkpoint: Optional[Path]
) -> Callable[[Mapping[str, Any]], Detections]:
    from streampetr_plugin.deploy.export import load_detector

    if checkpoint is None:
        raise InputError(
            describe("--checkpoint", "required with --backend torch", "pass the trained checkpoint")
        )
    detector = load_detector(recipe, host, checkpoint)
    detector.stream_state.reset()

    def step(batch: Mapping[str, Any]) -> Detections:
        return {name: value.numpy() for name, value in detector(batch).detections[0].items()}

    return step


def _onnxruntime_step(
    recipe: Recipe, onnx_dir: Optional[Path], threads: int
) -> Callable[[Mapping[str, Any]], Detections]:
    from streampetr_plugin.deploy.export import recipe_nms_radius, recipe_test_shape
    from streampetr_plugin.deploy.onnx_runner import OnnxStreamRunner

    if onnx_dir is None:
        raise InputError(
            describe(
                "--onnx",
                "required with --backend onnxruntime",
                "pass the directory `streampetr export` wrote",
            )
        )
    runner = OnnxStreamRunner(onnx_dir, threads=threads, nms_radius=recipe_nms_radius(recipe))
    num_cameras, (height, width) = recipe_test_shape(recipe)
    graph_shape = tuple(next(node.shape for node in runner.ort_session.get_inputs() if node.name == "img"))
    if graph_shape != (1, num_cameras, 3, height, width):
        raise InputError(
            describe(
                str(runner.path),
                f"the graph takes images {graph_shape}, the recipe gives "
                f"{(1, num_cameras, 3, height, width)}",
                "export it with this recipe",
            )
        )
    return lambda batch: runner.step(batch).detections


def infer_command(
    recipe: Recipe,
    *,
    host: PluginHost,
    checkpoint: Optional[Path] = None,
    backend: str = "torch",
    onnx_dir: Optional[Path] = None,
    split: str = "val",
    out_dir: Optional[Path] = None,
    pictures: int = 0,
    threads: Optional[int] = None,
    tasks: Sequence[str] = ("detection",),
) -> InferResult:
    """Run the split through ``backend`` and write the results of ``tasks`` (``"detection"``,
    ``"tracking"``; see the module docstring). Both backends run ``threads`` CPU threads (default: the
    recipe's ``cpu_threads`` setting, else PyTorch's)."""
    if backend not in BACKENDS:
        raise InputError(
            describe("--backend", f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        )
    with torch_threads(threads if threads is not None else recipe_threads(recipe)) as threads_in_use:
        if backend == "torch":
            step = _torch_step(recipe, host, checkpoint)
        else:
            step = _onnxruntime_step(recipe, onnx_dir, threads_in_use)
        return _infer(recipe, host.registries, step, split=split, out_dir=out_dir, pictures=pictures,
                      backend=backend, tasks=tasks)


def _infer(
    recipe: Recipe,
    registries: Registries,
    step: Callable[[Mapping[str, Any]], Detections],
    *,
    split: str,
    out_dir: Optional[Path],
    pictures: int,
    backend: str,
    tasks: Sequence[str],
) -> InferResult:
    from streampetr_plugin.data.infos import InfoSet
    from streampetr_plugin.evaluation.nuscenes_metric import format_nuscenes_results
    from streampetr_plugin.evaluation.predictions import PREDICTIONS_FILE, save_predictions

    dataset = split_dataset(recipe, registries, split)
    if not hasattr(dataset, "samples"):
        raise InputError(
            describe(f"data.{split}", "not a nuScenes-style dataset", "infer writes nuScenes results")
        )
    out_dir = Path(out_dir) if out_dir is not None else Path(recipe.work_dir()) / "infer" / backend
    out_dir.mkdir(parents=True, exist_ok=True)

    predictions: Dict[str, Detections] = {}
    model_seconds = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in stream_batches(recipe, registries, split=split, dataset=dataset):
            step_start = time.perf_counter()
            predictions[batch["sample_token"][0]] = step(batch)
            model_seconds += time.perf_counter() - step_start
    total_seconds = time.perf_counter() - start

    infos = InfoSet(version=dataset.version, samples=list(dataset.samples))
    results_path = tracking_results_path = None
    if "detection" in tasks:
        results_path = out_dir / RESULTS_FILE
        results = format_nuscenes_results(predictions, infos, classes=dataset.classes)
        results_path.write_text(json.dumps(results))
    if "tracking" in tasks:
        tracking_results_path = _write_tracks(recipe, registries, predictions, infos, out_dir,
                                              classes=dataset.classes)
    predictions_path = save_predictions(predictions, out_dir / PREDICTIONS_FILE)
    drawn = _draw(dataset, predictions, out_dir, count=pictures, class_names=recipe.data.class_names)
    return InferResult(
        results_path=results_path,
        tracking_results_path=tracking_results_path,
        predictions_path=predictions_path,
        pictures=drawn,
        frames=len(predictions),
        model_seconds=model_seconds,
        total_seconds=total_seconds,
    )


def _write_tracks(
    recipe: Recipe,
    registries: Registries,
    predictions: Dict[str, Detections], infos: Any, out_dir: Path, *, classes: Sequence[str]
) -> Path:
    """Track the split with the recipe's tracker, give every prediction its ``track_ids_3d`` and write the
    tracking submission; returns its path."""
    from streampetr_plugin.evaluation.nuscenes_tracking import RESULTS_FILE as TRACKING_RESULTS_FILE
    from streampetr_plugin.evaluation.nuscenes_tracking import format_tracking_results
    from streampetr_plugin.tracking.build import build_tracker
    from streampetr_plugin.evaluation.scenes import track_scenes

    track_ids = track_scenes(build_tracker(recipe, registries), predictions, infos, classes=classes)
    for token, ids in track_ids.items():
        predictions[token]["track_ids_3d"] = ids
    path = out_dir / TRACKING_RESULTS_FILE
    path.write_text(json.dumps(format_tracking_results(predictions, track_ids, infos, classes=classes)))
    return path


def _draw(
    dataset: Any, predictions: Mapping[str, Detections], out_dir: Path, *, count: int, class_names: Any
) -> List[Path]:
    from streampetr_plugin.visualization.dataset_pictures import render_dataset_sample

    drawn = []
    for index, sample in enumerate(dataset.samples[:count]):
        path = out_dir / f"sample_{sample.token}.png"
        drawn.append(
            render_dataset_sample(dataset, index, predictions[sample.token], path, class_names=class_names)
        )
    return drawn
