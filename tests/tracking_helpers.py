"""Hand-made tracking frames and an independent count of identity switches."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from streampetr_plugin.tracking.frame import TrackingFrame

FRAME_SECONDS = 0.5  # nuScenes key frames


def make_frame(
    index: int,
    centers: Sequence[Sequence[float]],
    *,
    velocities: Optional[Sequence[Sequence[float]]] = None,
    names: Optional[Sequence[str]] = None,
    scores: Optional[Sequence[float]] = None,
    query_ids: Optional[Sequence[int]] = None,
) -> TrackingFrame:
    """Frame ``index`` (0.5 s apart) with N detections: cars scoring 0.9 at rest unless told otherwise."""
    count = len(centers)
    return TrackingFrame(
        timestamp=index * FRAME_SECONDS,
        names=np.array(names if names is not None else ["car"] * count, dtype=str),
        centers=np.array(centers, dtype=np.float64).reshape(-1, 2),
        velocities=np.array(velocities if velocities is not None else [[0.0, 0.0]] * count,
                            dtype=np.float64).reshape(-1, 2),
        scores=np.array(scores if scores is not None else [0.9] * count, dtype=np.float64),
        query_ids=None if query_ids is None else np.array(query_ids, dtype=np.int64),
    )


def identity_switches(track_ids_per_object: Dict[str, List[int]]) -> int:
    """How often an object's track id differs from its id in the previous frame (-1 frames skipped)."""
    switches = 0
    for ids in track_ids_per_object.values():
        seen = [track_id for track_id in ids if track_id >= 0]
        switches += sum(1 for before, now in zip(seen, seen[1:]) if before != now)
    return switches
