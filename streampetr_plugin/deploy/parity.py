"""How closely an exported graph follows the PyTorch eval path, measured over streamed frames.

Three comparisons with the detector's eager inference (absolute float64 times, the reference's path)
on the same frames, each an :class:`Agreement`:

* ``onnxruntime``: the graph in onnxruntime, carrying its own memory from frame to frame (what a
  deployment does);
* ``onnxruntime_teacher_forced``: the graph in onnxruntime fed the eager memory of the previous
  frame, so every frame isolates the graph's own error;
* ``relative_time_torch``: the same frame module in PyTorch carrying its own float32 relative-time
  memory, which isolates the effect of relative times.

Logits and box codes are compared per query (the last decoder layer), detections as sets: those
scoring at least ``score_threshold`` on the eager side, matched to the other side's by class and
nearest centre.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np
import torch

from streampetr_plugin.deploy.graph import (
    FRAME_INPUTS,
    MEMORY_INPUTS,
    MEMORY_OUTPUTS,
    StreamClock,
    StreamingFrameGraph,
    frame_inputs,
    kept_detections,
)
from streampetr_plugin.deploy.onnx_runner import OnnxStreamRunner
from streampetr_plugin.models.detector import StreamPETRDetector
from streampetr_plugin.models.layers.memory import MEMORY_FIELDS

DEFAULT_SCORE_THRESHOLD = 0.3


@dataclass
class Agreement:
    """One comparison over all frames: the largest absolute differences of the last layer's logits
    (``max_logit_error``) and box codes (``max_box_error``, metric centres), the eager detections
    at or above the threshold (``detections``), the frames whose detections differ in count or classes
    (``mismatched_frames``) and, over matched detections, the largest distance between gravity centres
    (metres) and score difference."""

    max_logit_error: float = 0.0
    max_box_error: float = 0.0
    detections: int = 0
    mismatched_frames: int = 0
    max_centre_error_m: float = 0.0
    max_score_error: float = 0.0

    def add_frame(
        self,
        *,
        reference: Mapping[str, np.ndarray],
        candidate: Mapping[str, np.ndarray],
        score_threshold: float,
    ) -> None:
        """Fold in one frame; both mappings hold ``cls_logits``, ``bbox_preds`` (Q', ...) and the
        detections ``boxes_3d``, ``scores_3d``, ``labels_3d``."""
        self.max_logit_error = max(
            self.max_logit_error, _max_abs(reference["cls_logits"], candidate["cls_logits"])
        )
        self.max_box_error = max(
            self.max_box_error, _max_abs(reference["bbox_preds"], candidate["bbox_preds"])
        )
        chosen = reference["scores_3d"] >= score_threshold
        other = candidate["scores_3d"] >= score_threshold
        self.detections += int(chosen.sum())
        labels, other_labels = reference["labels_3d"][chosen], candidate["labels_3d"][other]
        if sorted(labels.tolist()) != sorted(other_labels.tolist()):
            self.mismatched_frames += 1
            return
        centres, other_centres = (
            _centres(reference["boxes_3d"][chosen]),
            _centres(candidate["boxes_3d"][other]),
        )
        scores, other_scores = reference["scores_3d"][chosen], candidate["scores_3d"][other]
        unmatched = list(range(len(other_labels)))
        for index in np.argsort(-scores):
            same_class = [j for j in unmatched if other_labels[j] == labels[index]]
            distances = [float(np.linalg.norm(other_centres[j] - centres[index])) for j in same_class]
            best = same_class[int(np.argmin(distances))]
            unmatched.remove(best)
            self.max_centre_error_m = max(self.max_centre_error_m, min(distances))
            self.max_score_error = max(self.max_score_error, abs(float(other_scores[best] - scores[index])))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class ParityReport:
    """:class:`Agreement` of each comparison (see the module docstring) over ``frames`` frames, of which
    ``stream_starts`` started a stream."""

    frames: int
    stream_starts: int
    score_threshold: float
    onnxruntime: Agreement
    onnxruntime_teacher_forced: Agreement
    relative_time_torch: Agreement

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _centres(boxes: np.ndarray) -> np.ndarray:
    """Gravity centres (K, 3) of bottom-centre boxes (K, 9)."""
    return boxes[:, :3] + np.stack([np.zeros(len(boxes)), np.zeros(len(boxes)), boxes[:, 5] / 2], axis=-1)


def _max_abs(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)).max())


def _numpy(values: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    return {
        name: np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        for name, value in values.items()
    }


def _relative_memory(
    state: Mapping[str, torch.Tensor], *, rows: int, previous_time: float
) -> Dict[str, np.ndarray]:
    """The eager memory ``state`` (absolute times, M + top-k rows) as the graph's memory inputs: the
    newest ``rows`` rows, ages relative to the frame at ``previous_time`` that wrote it last."""
    relative = dict(state)
    relative["timestamp"] = state["timestamp"] + previous_time  # minus the writing time + now: the age
    return {f"memory.{field}": relative[field][:, :rows].float().numpy() for field in MEMORY_FIELDS}


@torch.no_grad()
def measure_parity(
    detector: StreamPETRDetector,
    runner: OnnxStreamRunner,
    batches: Iterable[Mapping[str, Any]],
    *,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> ParityReport:
    """Compare ``runner``'s graph with ``detector`` (eval mode) on the one-stream ``batches`` in order;
    both start afresh and ``detector``'s memory is reset at the end."""
    head = detector.pts_bbox_head
    frame_module = StreamingFrameGraph(detector)
    detector.stream_state.reset()
    runner.reset()
    clock = StreamClock()
    report = ParityReport(
        frames=0,
        stream_starts=0,
        score_threshold=score_threshold,
        onnxruntime=Agreement(),
        onnxruntime_teacher_forced=Agreement(),
        relative_time_torch=Agreement(),
    )
    torch_memory: Dict[str, torch.Tensor] = {}
    previous_time = 0.0
    try:
        for batch in batches:
            eager_state = detector.stream_state.memory.save()
            outputs = detector.infer(batch)
            eager = _numpy(
                {
                    "cls_logits": outputs.all_cls_scores[-1][0],
                    "bbox_preds": outputs.all_bbox_preds[-1][0],
                    **outputs.detections[0],
                }
            )
            prev_exists, time_delta = clock.advance(
                scene_token=batch["scene_token"][0], timestamp=float(batch["timestamp"][0])
            )
            frame = frame_inputs(batch, time_delta=time_delta, prev_exists=prev_exists)
            report.frames += 1
            report.stream_starts += int(not prev_exists)

            carried = runner.run(frame)
            report.onnxruntime.add_frame(
                reference=eager,
                candidate=_graph_view(carried.outputs, runner.nms_radius),
                score_threshold=score_threshold,
            )
            if prev_exists:
                forced_memory = _relative_memory(
                    eager_state, rows=head.params.memory_len, previous_time=previous_time
                )
            else:
                forced_memory = runner.zero_memory()
            forced = runner.evaluate(frame, forced_memory)
            report.onnxruntime_teacher_forced.add_frame(
                reference=eager,
                candidate=_graph_view(forced, runner.nms_radius),
                score_threshold=score_threshold,
            )

            if not prev_exists:  # always so at the first frame
                torch_memory = {name: torch.zeros(shape) for name, shape in runner.memory_shapes.items()}
            values = frame_module(
                *[torch.from_numpy(frame[name]) for name in FRAME_INPUTS],
                *[torch_memory[name] for name in MEMORY_INPUTS],
            )
            torch_outputs = dict(zip(runner.output_names, values))
            torch_memory = {
                name: torch_outputs[next_name] for name, next_name in zip(MEMORY_INPUTS, MEMORY_OUTPUTS)
            }
            report.relative_time_torch.add_frame(
                reference=eager,
                candidate=_graph_view(_numpy(torch_outputs), runner.nms_radius),
                score_threshold=score_threshold,
            )
            previous_time = float(batch["timestamp"][0])
    finally:
        detector.stream_state.reset()
        runner.reset()
    return report


def _graph_view(outputs: Mapping[str, np.ndarray], nms_radius: Optional[float]) -> Dict[str, np.ndarray]:
    """A frame's graph outputs as :meth:`Agreement.add_frame` takes them (one stream, kept pairs)."""
    return {
        "cls_logits": outputs["cls_logits"][0],
        "bbox_preds": outputs["bbox_preds"][0],
        **kept_detections(outputs, nms_radius=nms_radius),
    }
