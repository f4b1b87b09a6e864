"""What a tracker sees of one frame, and what every tracker provides."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

NOT_TRACKED = -1  # the track id of a detection a tracker does not output


@dataclass
class TrackingFrame:
    """The detections of one sample, in the global frame (the ego moves, the world does not).

    Fields:
        timestamp: seconds (the sample's time; only differences between frames matter).
        names: (N,) str class names.
        centers: (N, 2) BEV gravity centres, global frame, metres.
        velocities: (N, 2) predicted (vx, vy), global frame, m/s.
        scores: (N,) detection scores.
        query_ids: (N,) int64 id of the decoder query each detection came from (see
            ``streampetr_plugin.models.layers.query_identities``), or None when the detector has none.
    """

    timestamp: float
    names: np.ndarray
    centers: np.ndarray
    velocities: np.ndarray
    scores: np.ndarray
    query_ids: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.scores)


class Tracker(Protocol):
    """What the ``trackers`` registry's factories return. One tracker follows one scene at a time."""

    def reset(self) -> None:
        """Forget every track: the next frame starts a new scene."""

    def update(self, frame: TrackingFrame) -> np.ndarray:
        """Track ids (N,) int64 of the frame's detections, ``NOT_TRACKED`` where a detection is not part of
        an output track. Frames come in time order; an id is never reused after :meth:`reset`."""
