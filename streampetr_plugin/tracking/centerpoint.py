"""The CenterPoint tracker: greedy, velocity-compensated centre-distance association per class.

Each frame, the detections (best score first) are moved back by their predicted velocity to the previous
frame's time and matched greedily to the nearest live track of their class within the class's gate
(Yin et al., "Center-based 3D Object Detection and Tracking", CVPR 2021, whose nuScenes tracker this
follows). A matched detection continues its track; an unmatched one starts a track when it scores at
least ``birth_score``; a track without a detection coasts on its velocity, unseen, for ``max_age``
frames and then ends. Only detections are output (a coasting track is not), with their own scores.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from streampetr_plugin.tracking.frame import NOT_TRACKED, TrackingFrame
from streampetr_plugin.tracking.tracks import TrackLifeParams, TrackSet, candidate_detections


class CenterPointTrackerParams(TrackLifeParams):
    """Options of :class:`CenterPointTracker` (all shared with the other built-in tracker)."""


class CenterPointTracker:
    """See the module docstring."""

    def __init__(self, params: Optional[CenterPointTrackerParams] = None) -> None:
        self.params = params if params is not None else CenterPointTrackerParams()
        self.tracks = TrackSet(max_age=self.params.max_age)

    def reset(self) -> None:
        self.tracks.clear()

    def update(self, frame: TrackingFrame) -> np.ndarray:
        track_ids = np.full(len(frame), NOT_TRACKED, dtype=np.int64)
        candidates = candidate_detections(frame, self.params)
        pairs = self.tracks.match(frame, candidates, list(self.tracks.tracks),
                                  max_distance=self.params.max_distance)
        for detection, track_id in pairs:
            self.tracks.continue_track(track_id, frame, detection)
            track_ids[detection] = track_id
        seen = {track_id for _, track_id in pairs}
        for detection in candidates:
            if track_ids[detection] == NOT_TRACKED and frame.scores[detection] >= self.params.birth_score:
                track_ids[detection] = self.tracks.start(frame, detection)
                seen.add(int(track_ids[detection]))
        self.tracks.finish_frame(frame, seen)
        return track_ids
