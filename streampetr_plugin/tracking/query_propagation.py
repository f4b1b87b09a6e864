"""The query-propagation tracker: a detection from a propagated memory query keeps that query's track.

StreamPETR writes its best queries of a frame to the memory and appends the newest memory rows to the
next frame's queries, so the query that found an object keeps finding it while it stays among the best.
The detector gives every detection the id of the query it came from (``query_ids``, see
``streampetr_plugin.models.layers.query_identities``); this tracker turns them into tracks. Detections
are taken best score first, each once:

1. a detection whose (query id, class) leads a live track continues it, wherever its box went, unless a
   better detection took that track already this frame;
2. with ``rematch`` on, a detection that continues no track by its query continues the nearest live track
   not yet taken, as the CenterPoint tracker matches (velocity-compensated centre distance within the
   class's gate): a new query that took over an object, or a better-scoring duplicate of it, keeps the
   object's track (and the query that lost it starts none below ``birth_score``);
3. a detection still without a track starts one when it scores at least ``birth_score``.

A track's leading queries are those whose detections continued it. Tracks end ``max_age`` frames after
their last detection, as in the CenterPoint tracker.
"""
from __future__ import annotations

from typing import Dict, Optional, Set, Tuple

import numpy as np
from pydantic import Field

from streampetr_plugin.errors import InputError, describe
from streampetr_plugin.tracking.frame import NOT_TRACKED, TrackingFrame
from streampetr_plugin.tracking.tracks import TrackLifeParams, TrackSet, candidate_detections


class QueryPropagationTrackerParams(TrackLifeParams):
    """Options of :class:`QueryPropagationTracker`."""

    rematch: bool = Field(
        True,
        description="A detection whose query leads no free track continues the nearest free track of its "
        "class within the gate (velocity-compensated centre distance, the CenterPoint rule); off: query "
        "identity alone.",
    )


class MissingQueryIdsError(InputError):
    """The detections carry no query ids (the detector does not propagate queries)."""


class QueryPropagationTracker:
    """See the module docstring."""

    def __init__(self, params: Optional[QueryPropagationTrackerParams] = None) -> None:
        self.params = params if params is not None else QueryPropagationTrackerParams()
        self.tracks = TrackSet(max_age=self.params.max_age)
        self._track_of_query: Dict[Tuple[int, str], int] = {}  # (query id, class) -> track id

    def reset(self) -> None:
        self.tracks.clear()
        self._track_of_query = {}

    def update(self, frame: TrackingFrame) -> np.ndarray:
        if frame.query_ids is None:
            raise MissingQueryIdsError(describe(
                "tracking.type", "query_propagation needs the query id of every detection (query_ids_3d), "
                "and the detector gives none", "use tracking.type=centerpoint",
            ))
        track_ids = np.full(len(frame), NOT_TRACKED, dtype=np.int64)
        taken: Set[int] = set()
        for detection in candidate_detections(frame, self.params):
            key = (int(frame.query_ids[detection]), str(frame.names[detection]))
            track_id = self._track_of_query.get(key)
            if track_id is None or track_id in taken:
                track_id = self._rematch(frame, detection, taken) if self.params.rematch else None
            if track_id is None:
                if frame.scores[detection] < self.params.birth_score:
                    continue
                track_id = self.tracks.start(frame, detection)
            self.tracks.continue_track(track_id, frame, detection)
            self._track_of_query[key] = track_id
            track_ids[detection] = track_id
            taken.add(track_id)
        ended = set(self.tracks.finish_frame(frame, taken))
        self._track_of_query = {key: track for key, track in self._track_of_query.items()
                                if track not in ended}
        return track_ids

    def _rematch(self, frame: TrackingFrame, detection: int, taken: Set[int]) -> Optional[int]:
        """The live track, not yet taken this frame, that ``detection`` continues by distance, or None."""
        free = [track_id for track_id in self.tracks.tracks if track_id not in taken]
        pairs = self.tracks.match(frame, [detection], free, max_distance=self.params.max_distance)
        return pairs[0][1] if pairs else None
