"""What a detector's ``forward(batch)`` returns, in each mode (the contract the trainer, the benchmark,
evaluation and the integrations read).

* training: :class:`TrainingOutputs`, the named loss terms of the frame;
* inference: :class:`InferenceOutputs`, the detections of every batch row.

A detection record is a dict with fixed names, the layout predictions files, the metric and the trackers
read: ``boxes_3d`` (K, 9) (x, y, z_bottom, dx, dy, dz, yaw, vx, vy) in the frame's LiDAR frame,
``scores_3d`` (K,), ``labels_3d`` (K,) int64, and ``query_ids_3d`` (K,) int64 (the decoder query each box
came from) where the detector has query identities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.utils._pytree as pytree


@dataclass
class TrainingOutputs:
    """A training frame's named terms: ``loss_cls``, ``d0.loss_bbox``, ... The total is the sum of the
    terms whose name contains "loss" (the reference's rule); the others (e.g. an attention share) are
    logged only."""

    losses: Dict[str, torch.Tensor]


@dataclass
class InferenceOutputs:
    """An inference frame's detections: one record (see the module docstring) per batch row."""

    detections: List[Dict[str, torch.Tensor]]


# DistributedDataParallel finds the tensors of a forward's output with pytree; registered, the loss terms
# inside are seen (with static_graph=True its first iteration synchronises gradients only through them).
pytree.register_dataclass(TrainingOutputs)
