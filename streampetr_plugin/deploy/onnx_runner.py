"""Run an exported StreamPETR graph with onnxruntime, one stream frame by frame.

:class:`OnnxStreamRunner` owns the memory state between frames: it feeds ``memory_next.<field>`` of a
frame into ``memory.<field>`` of the next, and starts from zeros whenever ``prev_exists`` is 0 (a new
stream; the graph would zero the rows itself, fresh zeros also keep anything non-finite out).
:meth:`OnnxStreamRunner.step` takes a batch of the batch contract and returns what the detector's eval
path returns for it; :meth:`OnnxStreamRunner.run` takes the frame inputs directly.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from streampetr_plugin.deploy.graph import (
    FRAME_INPUTS,
    MEMORY_INPUTS,
    MEMORY_OUTPUTS,
    StreamClock,
    batch_frame_inputs,
    kept_detections,
)
from streampetr_plugin.errors import InputError, describe

ONNX_FILE = "streampetr.onnx"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class DeployDependencyError(InputError):
    """A package of the ``deploy`` extra (onnx, onnxruntime, onnxscript) is not installed."""


def import_deploy_module(name: str) -> Any:
    """The module ``name`` of the ``deploy`` extra, or :class:`DeployDependencyError` saying how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise DeployDependencyError(
            describe(name, "not installed", "pip install 'streampetr-plugin[deploy]'")
        ) from error


def resolve_onnx_path(path: Union[str, Path]) -> Path:
    """``path`` itself, or ``path/streampetr.onnx`` for an export directory; InputError if missing."""
    path = Path(path)
    if path.is_dir():
        path = path / ONNX_FILE
    if not path.is_file():
        raise InputError(describe(str(path), "no exported graph there", "run `streampetr export` first"))
    return path


@dataclass
class FrameResult:
    """One frame: the eval output (``detections``: ``boxes_3d`` (K, 9), ``scores_3d`` (K,), ``labels_3d``
    (K,), the pairs the decoder keeps) and every graph output by name (``outputs``)."""

    detections: Dict[str, np.ndarray]
    outputs: Dict[str, np.ndarray]


class OnnxStreamRunner:
    """One stream through an exported graph (see the module docstring).

    Args:
        onnx_path: the ``.onnx`` file or the export directory holding ``streampetr.onnx``.
        threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).
        optimization: onnxruntime graph optimisation level, one of ``OPTIMIZATION_LEVELS``.
        nms_radius: the recipe's ``model.head.nms_radius`` (the decoder's duplicate suppression, which
            runs here because the graph leaves it out); None: none.
    """

    def __init__(
        self,
        onnx_path: Union[str, Path],
        *,
        threads: Optional[int] = None,
        optimization: str = "all",
        nms_radius: Optional[float] = None,
    ) -> None:
        ort = import_deploy_module("onnxruntime")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.nms_radius = nms_radius
        self.path = resolve_onnx_path(onnx_path)
        self.ort_session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        shapes = {node.name: tuple(node.shape) for node in self.ort_session.get_inputs()}
        missing = [name for name in (*FRAME_INPUTS, *MEMORY_INPUTS) if name not in shapes]
        if missing:
            raise InputError(
                describe(
                    str(self.path),
                    f"not a StreamPETR frame graph (no inputs {missing})",
                    "export it with `streampetr export`",
                )
            )
        self.memory_shapes = {name: shapes[name] for name in MEMORY_INPUTS}
        self.output_names = [node.name for node in self.ort_session.get_outputs()]
        self.clock = StreamClock()
        self.memory: Dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next frame starts it afresh."""
        self.memory = self.zero_memory()
        self.clock.reset()

    def zero_memory(self) -> Dict[str, np.ndarray]:
        """The memory of a stream that has not started: zeros of every ``memory.<field>``."""
        return {name: np.zeros(shape, dtype=np.float32) for name, shape in self.memory_shapes.items()}

    def run(self, frame: Mapping[str, np.ndarray]) -> FrameResult:
        """Run one frame of ``FRAME_INPUTS`` arrays (``time_delta`` and ``prev_exists`` included) on the
        carried memory and carry ``memory_next`` forward."""
        if float(frame["prev_exists"][0]) == 0.0:
            self.memory = self.zero_memory()
        outputs = self.evaluate(frame, self.memory)
        self.memory = {name: outputs[next_name] for name, next_name in zip(MEMORY_INPUTS, MEMORY_OUTPUTS)}
        return FrameResult(detections=kept_detections(outputs, nms_radius=self.nms_radius), outputs=outputs)

    def evaluate(
        self, frame: Mapping[str, np.ndarray], memory: Mapping[str, np.ndarray]
    ) -> Dict[str, np.ndarray]:
        """Every graph output, by name, of ``frame`` on ``memory`` (the carried memory is untouched)."""
        values = self.ort_session.run(
            self.output_names, {**{name: frame[name] for name in FRAME_INPUTS}, **memory}
        )
        return dict(zip(self.output_names, values))

    def step(self, batch: Mapping[str, Any]) -> FrameResult:
        """Run the next frame of the stream from a one-stream batch (batch contract): ``prev_exists`` and
        ``time_delta`` follow from its scene token and timestamp (a new scene restarts the stream)."""
        return self.run(batch_frame_inputs(batch, self.clock))
