"""One frame of one stream as a graph: the detector's eval path with the memory as explicit state.

:class:`StreamingFrameGraph` wraps a :class:`~streampetr_plugin.models.detector.StreamPETRDetector`
(its own modules, nothing re-implemented): every call loads the memory inputs into the memory of a
relative-time :class:`~streampetr_plugin.models.stream_state.StreamState` of its own, runs the detector's
inference path on that state (the detector's ``stream_state`` is left alone) and returns the fixed-size
decoding and the memory to feed into the next frame. Its signature is the
exported graph's (:func:`graph_signature`; B = 1, N cameras, padded H x W, M = ``memory_len``, C =
``embed_dims``, Q' = queries + propagated rows, K = the decoder's ``max_num``):

========================  ====================  =================================================
name                      shape, dtype          meaning
========================  ====================  =================================================
``img``                   (1, N, 3, H, W) f32   normalised, padded images (the batch contract)
``lidar2img``             (1, N, 4, 4) f32      LiDAR -> padded-image pixels
``intrinsics``            (1, N, 4, 4) f32      camera viewpads (only the focal lengths are read)
``extrinsics``            (1, N, 4, 4) f32      LiDAR -> camera (part of the contract; not read)
``ego_pose``              (1, 4, 4) f32         LiDAR -> global
``ego_pose_inv``          (1, 4, 4) f32         global -> LiDAR
``time_delta``            (1,) f32              seconds since the stream's previous frame
``prev_exists``           (1,) f32              0 at the first frame of a stream, else 1
``memory.embedding``      (1, M, C) f32         remembered decoder outputs
``memory.reference_point`` (1, M, 3) f32        their centres, global frame, metres
``memory.timestamp``      (1, M, 1) f32         their ages at the previous frame, seconds
``memory.egopose``        (1, M, 4, 4) f32      their LiDAR frames -> global
``memory.velo``           (1, M, 2) f32         their velocities, m/s
========================  ====================  =================================================

Outputs: ``boxes_3d`` (1, K, 9) f32 (x, y, z_bottom, dx, dy, dz, yaw, vx, vy), ``scores_3d`` (1, K) f32
descending, ``labels_3d`` (1, K) i64 (the eval decoder's top K; ``scores_3d`` is -1 where the decoder
drops a pair, so any score threshold >= 0 gives the eval output), ``cls_logits`` (1, Q', classes) f32
and ``bbox_preds`` (1, Q', 10) f32 (the last decoder layer, for verification and custom decoding), and
``memory_next.<field>`` for every ``memory.<field>``.

The memory holds the newest M rows. The eager memory holds M + top-k between frames, but the frame
drops the oldest top-k first and every operation on it is row-wise, so M rows give the same result.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from streampetr_plugin.models.box_ops import suppress_among_kept
from streampetr_plugin.models.detector import StreamPETRDetector
from streampetr_plugin.models.layers.memory import MEMORY_FIELDS

FRAME_INPUTS: Tuple[str, ...] = (
    "img",
    "lidar2img",
    "intrinsics",
    "extrinsics",
    "ego_pose",
    "ego_pose_inv",
    "time_delta",
    "prev_exists",
)
DETECTION_OUTPUTS: Tuple[str, ...] = ("boxes_3d", "scores_3d", "labels_3d")
MEMORY_INPUTS: Tuple[str, ...] = tuple(f"memory.{field}" for field in MEMORY_FIELDS)
MEMORY_OUTPUTS: Tuple[str, ...] = tuple(f"memory_next.{field}" for field in MEMORY_FIELDS)
DROPPED_SCORE = -1.0  # scores_3d of pairs the eval decoder drops


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    shape: Tuple[int, ...]
    dtype: str  # numpy name: float32 or int64

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSignature:
    """Inputs and outputs of the exported frame, in graph order."""

    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]


def graph_signature(
    detector: StreamPETRDetector, *, num_cameras: int, image_hw: Tuple[int, int]
) -> GraphSignature:
    """The graph's inputs and outputs for ``detector`` at ``num_cameras`` padded ``image_hw`` images."""
    head = detector.pts_bbox_head
    height, width = image_hw
    num_queries = head.params.num_query + head.params.num_propagated
    top_k = min(head.bbox_coder.max_num, num_queries * head.num_classes)
    rows = head.params.memory_len
    memory = {
        "embedding": (1, rows, head.params.embed_dims),
        "reference_point": (1, rows, 3),
        "timestamp": (1, rows, 1),
        "egopose": (1, rows, 4, 4),
        "velo": (1, rows, 2),
    }
    frame = {
        "img": (1, num_cameras, 3, height, width),
        "lidar2img": (1, num_cameras, 4, 4),
        "intrinsics": (1, num_cameras, 4, 4),
        "extrinsics": (1, num_cameras, 4, 4),
        "ego_pose": (1, 4, 4),
        "ego_pose_inv": (1, 4, 4),
        "time_delta": (1,),
        "prev_exists": (1,),
    }
    inputs = [TensorSpec(name, frame[name], "float32") for name in FRAME_INPUTS]
    inputs += [TensorSpec(f"memory.{field}", memory[field], "float32") for field in MEMORY_FIELDS]
    outputs = [
        TensorSpec("boxes_3d", (1, top_k, 9), "float32"),
        TensorSpec("scores_3d", (1, top_k), "float32"),
        TensorSpec("labels_3d", (1, top_k), "int64"),
        TensorSpec("cls_logits", (1, num_queries, head.num_classes), "float32"),
        TensorSpec("bbox_preds", (1, num_queries, 10), "float32"),
    ]
    outputs += [TensorSpec(f"memory_next.{field}", memory[field], "float32") for field in MEMORY_FIELDS]
    return GraphSignature(inputs=tuple(inputs), outputs=tuple(outputs))


class StreamingFrameGraph(nn.Module):
    """The exported frame (see the module docstring); ``forward`` takes the inputs in graph order."""

    def __init__(self, detector: StreamPETRDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(
        self,
        img: torch.Tensor,
        lidar2img: torch.Tensor,
        intrinsics: torch.Tensor,
        extrinsics: torch.Tensor,
        ego_pose: torch.Tensor,
        ego_pose_inv: torch.Tensor,
        time_delta: torch.Tensor,
        prev_exists: torch.Tensor,
        *memory_state: torch.Tensor,
    ) -> Tuple[torch.Tensor, ...]:
        head = self.detector.pts_bbox_head
        stream = head.new_stream_state(relative_time=True)
        stream.memory.load(dict(zip(MEMORY_FIELDS, memory_state)))
        batch = {
            "img": img,
            "lidar2img": lidar2img,
            "intrinsics": intrinsics,
            "extrinsics": extrinsics,
            "ego_pose": ego_pose,
            "ego_pose_inv": ego_pose_inv,
            "timestamp": time_delta,
        }
        outs = self.detector.head_outputs(batch, prev_exists, stream=stream)
        decoded = head.decode_fixed(outs)
        scores = torch.where(decoded["keep"], decoded["scores_3d"], DROPPED_SCORE)
        # The memory holds M + top-k rows now; the next frame keeps the newest M (see the module docstring).
        memory_next = [getattr(stream.memory, field)[:, : stream.memory.capacity] for field in MEMORY_FIELDS]
        return (
            decoded["boxes_3d"],
            scores,
            decoded["labels_3d"],
            outs.all_cls_scores[-1],
            outs.all_bbox_preds[-1],
            *memory_next,
        )


def kept_detections(
    outputs: Mapping[str, np.ndarray], *, nms_radius: Optional[float] = None
) -> Dict[str, np.ndarray]:
    """The eval output of one frame's graph outputs: ``boxes_3d`` (K, 9), ``scores_3d`` (K,), ``labels_3d``
    (K,) of the pairs the decoder keeps (score >= 0), less the duplicates within ``nms_radius`` metres
    (the decoder's class-wise suppression, which the graph leaves out: it is greedy and data-dependent)."""
    keep = outputs["scores_3d"][0] >= 0  # (K,), scores in descending order
    if nms_radius is not None:
        centres = torch.from_numpy(outputs["boxes_3d"][0][:, :2])
        labels = torch.from_numpy(outputs["labels_3d"][0])
        keep = suppress_among_kept(centres, labels, torch.from_numpy(keep), nms_radius).numpy()
    return {name: outputs[name][0][keep] for name in DETECTION_OUTPUTS}


def frame_inputs(batch: Mapping[str, Any], *, time_delta: float, prev_exists: bool) -> Dict[str, np.ndarray]:
    """The frame inputs (``FRAME_INPUTS``) of the one-stream ``batch`` (batch contract, B = 1)."""

    def array(name: str) -> np.ndarray:
        return np.ascontiguousarray(batch[name].detach().cpu().numpy(), dtype=np.float32)

    if batch["img"].shape[0] != 1:
        raise ValueError(f"the graph runs one stream; the batch has {batch['img'].shape[0]} rows")
    inputs = {name: array(name) for name in FRAME_INPUTS[:6]}
    inputs["time_delta"] = np.array([time_delta], dtype=np.float32)
    inputs["prev_exists"] = np.array([1.0 if prev_exists else 0.0], dtype=np.float32)
    return inputs


class StreamClock:
    """What a stream's frame needs from its predecessor: ``prev_exists`` (False at the first frame and
    whenever the scene token changes, as the detector decides at inference) and ``time_delta``, the
    seconds since the previous frame, taken between float64 timestamps (0 at a stream's start)."""

    def __init__(self) -> None:
        self._previous: Optional[Tuple[str, float]] = None

    def reset(self) -> None:
        self._previous = None

    def advance(self, *, scene_token: str, timestamp: float) -> Tuple[bool, float]:
        """(prev_exists, time_delta) of the frame at ``timestamp`` (absolute seconds) in ``scene_token``."""
        previous, self._previous = self._previous, (scene_token, float(timestamp))
        if previous is None or previous[0] != scene_token:
            return False, 0.0
        return True, float(timestamp) - previous[1]


def batch_frame_inputs(batch: Mapping[str, Any], clock: StreamClock) -> Dict[str, np.ndarray]:
    """:func:`frame_inputs` of a one-stream batch, ``prev_exists`` and ``time_delta`` from ``clock``."""
    prev_exists, time_delta = clock.advance(
        scene_token=batch["scene_token"][0], timestamp=float(batch["timestamp"][0])
    )
    return frame_inputs(batch, time_delta=time_delta, prev_exists=prev_exists)


def example_inputs(signature: GraphSignature) -> List[torch.Tensor]:
    """Inputs of the signature's shapes for tracing: identity poses and projections, a restarting stream."""
    tensors = []
    for spec in signature.inputs:
        tensor = torch.zeros(spec.shape, dtype=torch.float32)
        if spec.name in ("lidar2img", "intrinsics", "extrinsics", "ego_pose", "ego_pose_inv"):
            tensor = tensor + torch.eye(4)
        tensors.append(tensor)
    return tensors
