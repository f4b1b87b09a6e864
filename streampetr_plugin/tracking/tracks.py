"""The tracks of one scene and their life cycle: birth by score, death by age, coasting on velocity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streampetr_plugin.tracking.association import compensated_distances, greedy_assignment
from streampetr_plugin.tracking.frame import TrackingFrame

# CenterPoint's nuScenes gates: the 99.9th percentile of each class's velocity error over one frame (0.5 s),
# in metres. They cover the seven nuScenes tracking classes; other classes are not tracked.
CENTERPOINT_MAX_DISTANCE: Dict[str, float] = {
    "bicycle": 3.0,
    "bus": 5.5,
    "car": 4.0,
    "motorcycle": 13.0,
    "pedestrian": 1.0,
    "trailer": 3.0,
    "truck": 4.0,
}


class TrackLifeParams(BaseModel):
    """Options every built-in tracker shares: which detections count, when tracks start and end."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(
        0.1, ge=0, le=1, description="Detections scoring below this are ignored (neither matched nor output)."
    )
    birth_score: float = Field(
        0.3, ge=0, le=1,
        description="A detection that continues no track starts one when it scores at least this.",
    )
    max_age: int = Field(
        3, ge=0,
        description="Frames a track lives on without a detection (coasting on its velocity, not output).",
    )
    max_distance: Dict[str, float] = Field(
        default_factory=lambda: dict(CENTERPOINT_MAX_DISTANCE),
        description="Per class: the largest velocity-compensated centre distance (m) at which a detection "
        "continues a track (CenterPoint's nuScenes gates by default); classes not listed are not tracked.",
    )


@dataclass
class Track:
    """One live track."""

    track_id: int
    name: str
    center: np.ndarray  # (2,) global BEV centre at the last frame's time (predicted while coasting)
    velocity: np.ndarray  # (2,) global m/s of its last detection
    misses: int = 0  # frames since its last detection


class TrackSet:
    """The live tracks of the current scene. Ids count up over the set's life, across scenes."""

    def __init__(self, *, max_age: int) -> None:
        self.max_age = max_age
        self.tracks: Dict[int, Track] = {}
        self.last_timestamp: Optional[float] = None
        self._next_id = 0

    def clear(self) -> None:
        """End every track (a new scene starts)."""
        self.tracks = {}
        self.last_timestamp = None

    def time_lag(self, frame: TrackingFrame) -> float:
        """Seconds since the previous frame of the scene (0 at its first)."""
        return 0.0 if self.last_timestamp is None else frame.timestamp - self.last_timestamp

    def match(
        self,
        frame: TrackingFrame,
        detections: Sequence[int],
        track_ids: Sequence[int],
        *,
        max_distance: Dict[str, float],
    ) -> List[Tuple[int, int]]:
        """(detection, track id) pairs: greedy, velocity-compensated, per class; ``detections`` (indices into
        ``frame``) in priority order, ``track_ids`` the tracks they may continue."""
        if not len(detections) or not len(track_ids):
            return []
        rows, tracks = np.asarray(detections), [self.tracks[track_id] for track_id in track_ids]
        distances = compensated_distances(
            centers=frame.centers[rows], velocities=frame.velocities[rows], names=frame.names[rows],
            track_centers=np.stack([track.center for track in tracks]),
            track_names=np.array([track.name for track in tracks]),
            time_lag=self.time_lag(frame), max_distance=max_distance,
        )
        return [(int(rows[row]), tracks[column].track_id) for row, column in greedy_assignment(distances)]

    def continue_track(self, track_id: int, frame: TrackingFrame, detection: int) -> None:
        track = self.tracks[track_id]
        track.center = frame.centers[detection].astype(np.float64)
        track.velocity = frame.velocities[detection].astype(np.float64)
        track.misses = 0

    def start(self, frame: TrackingFrame, detection: int) -> int:
        """A new track at ``detection``; returns its id."""
        track_id = self._next_id
        self._next_id += 1
        self.tracks[track_id] = Track(
            track_id=track_id, name=str(frame.names[detection]),
            center=frame.centers[detection].astype(np.float64),
            velocity=frame.velocities[detection].astype(np.float64),
        )
        return track_id

    def finish_frame(self, frame: TrackingFrame, seen: Set[int]) -> List[int]:
        """Age the tracks not in ``seen``: those past ``max_age`` end, the others coast to the frame's time.
        Returns the ids that ended."""
        time_lag = self.time_lag(frame)
        ended = []
        for track in list(self.tracks.values()):
            if track.track_id in seen:
                continue
            track.misses += 1
            if track.misses > self.max_age:
                del self.tracks[track.track_id]
                ended.append(track.track_id)
            else:
                track.center = track.center + track.velocity * time_lag
        self.last_timestamp = frame.timestamp
        return ended


def candidate_detections(frame: TrackingFrame, params: TrackLifeParams) -> np.ndarray:
    """Indices of the detections a tracker considers: tracked classes, at least ``score_threshold``, best
    score first."""
    tracked = np.isin(frame.names.astype(str), list(params.max_distance))
    indices = np.flatnonzero(tracked & (frame.scores >= params.score_threshold))
    return indices[np.argsort(-frame.scores[indices], kind="stable")]
