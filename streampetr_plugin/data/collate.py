"""Collate frames from :class:`~streampetr_plugin.data.dataset.NuScenesStreamDataset` into a batch.

The batch layout is the contract in :mod:`streampetr_plugin.data.batch`.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from .batch import CAMERA_KEYS, IMAGE_KEYS, META_KEYS, POSE_KEYS, TARGET_KEYS

__all__ = ["collate_frames"]


def collate_frames(frames: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Stack B frames: tensors gain a leading batch dim, tokens become lists of B strings, targets
    (present only when every frame carries them) become per-frame lists.

    Returns ``img`` (B, N, 3, H, W), ``intrinsics`` / ``extrinsics`` / ``lidar2img`` (B, N, 4, 4),
    ``timestamp`` (B,) f64, ``ego_pose`` / ``ego_pose_inv`` (B, 4, 4), ``prev_exists`` (B,),
    ``scene_token`` / ``sample_token`` list[str], and optionally the TARGET_KEYS lists.
    """
    if not frames:
        raise ValueError("collate_frames needs at least one frame")
    batch: Dict[str, object] = {}
    for key in IMAGE_KEYS + CAMERA_KEYS + POSE_KEYS:
        batch[key] = torch.stack([frame[key] for frame in frames])
    batch["timestamp"] = batch["timestamp"].to(torch.float64)
    for key in META_KEYS:
        batch[key] = [frame[key] for frame in frames]
    if all(key in frame for frame in frames for key in TARGET_KEYS):
        for key in TARGET_KEYS:
            batch[key] = [frame[key] for frame in frames]
    return batch
