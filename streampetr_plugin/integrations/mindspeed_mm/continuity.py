"""Decide, per batch row, whether a frame continues the stream the row's memory holds.

Under MindSpeed-MM the model cannot trust that consecutive calls carry consecutive frames: rank
buckets cut scenes, the host's epoch wraps around, a resumed run starts mid-scene with empty memory,
and validation reuses the training model. Every frame therefore carries integer ``scene_idx`` and
``frame_idx`` (position in its scene); a row continues only when it sees the same scene and the next
frame, otherwise its memory is reset. In the ordinary in-order stream this agrees with the loader's
own ``prev_exists`` everywhere (both are multiplied), so nothing changes where nothing went wrong.
"""

from __future__ import annotations

from typing import Optional

import torch


class StreamContinuity:
    """The last ``(scene_idx, frame_idx)`` of every row (plain state, not part of the state dict)."""

    def __init__(self) -> None:
        self._last: Optional[torch.Tensor] = None  # (B, 2) int64

    def reset(self) -> None:
        self._last = None

    def update(self, scene_idx: torch.Tensor, frame_idx: torch.Tensor) -> torch.Tensor:
        """Record this call's frames; returns (B,) float32, 1 where the row continues its stream."""
        current = torch.stack((scene_idx.long(), frame_idx.long()), dim=-1)  # (B, 2)
        previous, self._last = self._last, current
        if previous is None or previous.shape != current.shape or previous.device != current.device:
            return torch.zeros(current.shape[0], dtype=torch.float32, device=current.device)
        same_scene = current[:, 0] == previous[:, 0]
        next_frame = current[:, 1] == previous[:, 1] + 1
        return (same_scene & next_frame).float()
