"""Whether the frame of each batch row continues the stream that row's memory holds.

Two rules, one per kind of caller:

* :class:`SceneTokenContinuity`, the detector's own rule at inference (the reference's): a row continues
  while its ``scene_token`` equals the previous call's;
* :class:`StreamContinuity`, for callers that cannot trust that consecutive calls carry consecutive
  frames (under MindSpeed-MM rank buckets cut scenes, the host's epoch wraps around, a resumed run
  starts mid-scene with empty memory, and validation reuses the training model): every frame carries
  integer ``scene_idx`` and ``frame_idx`` (position in its scene) and a row continues only when it sees
  the same scene and the next frame. In the ordinary in-order stream this agrees with the loader's own
  ``prev_exists`` everywhere (both are multiplied), so nothing changes where nothing went wrong.

Both return (B,) float32, 1 where the row continues, and start every row afresh after :meth:`reset` or
when the number of rows changes.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from streampetr_plugin.models.layers.functional import upload


class SceneTokenContinuity:
    """The scene token of every row at the previous call."""

    def __init__(self) -> None:
        self._tokens: Optional[List[str]] = None

    def reset(self) -> None:
        self._tokens = None

    def update(self, scene_tokens: Sequence[str], device: torch.device) -> torch.Tensor:
        """Record this call's scene tokens; returns (B,) float32 on ``device``, 1 where the row continues."""
        tokens = list(scene_tokens)
        previous, self._tokens = self._tokens, tokens
        if previous is None or len(previous) != len(tokens):
            continues = [False] * len(tokens)
        else:
            continues = [now == before for now, before in zip(tokens, previous)]
        return upload(torch.tensor(continues, dtype=torch.float32), device)


class StreamContinuity:
    """The last ``(scene_idx, frame_idx)`` of every row."""

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
