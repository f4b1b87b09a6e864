"""Run a tracker over the evaluated samples: scene by scene, each in time order."""
from __future__ import annotations

import math
from typing import Any, Collection, Dict, List, Mapping, Sequence

import numpy as np

from streampetr_plugin.data.infos import InfoSet, SampleInfo
from streampetr_plugin.evaluation.nuscenes_metric import format_nuscenes_results
from streampetr_plugin.tracking.frame import Tracker, TrackingFrame

Predictions = Mapping[str, Mapping[str, Any]]
RESTART_ID_STRIDE = 1 << 40  # query ids per stretch between restarts, far more than any evaluation uses


def scenes_in_time_order(infos: InfoSet) -> List[List[SampleInfo]]:
    """The samples of ``infos`` grouped by scene (in order of first appearance), each scene by timestamp."""
    scenes: Dict[str, List[SampleInfo]] = {}
    for sample in infos.samples:
        scenes.setdefault(sample.scene_token, []).append(sample)
    return [sorted(samples, key=lambda sample: sample.timestamp) for samples in scenes.values()]


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def tracking_frames(
    predictions: Predictions, infos: InfoSet, *, classes: Sequence[str], restarts: Collection[str] = ()
) -> Dict[str, TrackingFrame]:
    """The :class:`TrackingFrame` of every sample of ``infos``: the detector's boxes (``boxes_3d`` (K, 9) in
    the sample's LiDAR frame, ``scores_3d``, ``labels_3d`` indices into ``classes``, optional
    ``query_ids_3d``) moved to the global frame as the detection submission moves them.

    Query ids count from 0 again where the detector's streams restarted (``restarts``: sample tokens, e.g.
    where one rank's part of the val set begins; ``infos.samples`` in the order the detector ran them);
    from each restart on they are moved up by another ``RESTART_ID_STRIDE``, so queries before and after
    a restart never share an id."""
    everywhere = {name: math.inf for name in classes}  # keep every box: rows stay aligned with the records
    submission = format_nuscenes_results(predictions, infos, classes=classes, class_range=everywhere)
    frames = {}
    restarted = 0
    for sample in infos.samples:
        restarted += sample.token in restarts
        records = submission["results"][sample.token]
        query_ids = predictions[sample.token].get("query_ids_3d")
        frames[sample.token] = TrackingFrame(
            timestamp=sample.timestamp / 1e6,
            names=np.array([record["detection_name"] for record in records], dtype=str),
            centers=np.array([r["translation"][:2] for r in records], dtype=np.float64).reshape(-1, 2),
            velocities=np.array([r["velocity"] for r in records], dtype=np.float64).reshape(-1, 2),
            scores=np.array([record["detection_score"] for record in records], dtype=np.float64),
            query_ids=None if query_ids is None
            else _as_numpy(query_ids).astype(np.int64).reshape(-1) + restarted * RESTART_ID_STRIDE,
        )
    return frames


def track_scenes(
    tracker: Tracker,
    predictions: Predictions,
    infos: InfoSet,
    *,
    classes: Sequence[str],
    restarts: Collection[str] = (),
) -> Dict[str, np.ndarray]:
    """Track ids (K,) int64 of every sample's predicted boxes, row for row (``NOT_TRACKED`` where a box is
    not part of a track); the tracker is reset at the start of every scene. ``restarts``: as for
    :func:`tracking_frames`."""
    frames = tracking_frames(predictions, infos, classes=classes, restarts=restarts)
    track_ids = {}
    for scene in scenes_in_time_order(infos):
        tracker.reset()
        for sample in scene:
            track_ids[sample.token] = tracker.update(frames[sample.token])
    return track_ids
