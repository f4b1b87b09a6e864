"""Trackers over a dataset's scenes: frames moved to the global frame, ids kept under ego motion."""
from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)
from tracking_helpers import identity_switches

from streampetr_plugin.config.schema import NUSCENES_CLASSES
from streampetr_plugin.data.geometry import pose_matrix
from streampetr_plugin.data.infos import InfoSet, load_infos
from streampetr_plugin.evaluation.scenes import (
    scenes_in_time_order,
    track_scenes,
    tracking_frames,
)
from streampetr_plugin.tracking.centerpoint import CenterPointTracker
from streampetr_plugin.tracking.frame import NOT_TRACKED
from streampetr_plugin.tracking.query_propagation import (
    QueryPropagationTracker,
    QueryPropagationTrackerParams,
)

TRACKED = ("car", "truck", "bus", "trailer", "motorcycle", "bicycle", "pedestrian")


@pytest.fixture(scope="module")
def scenes(synthetic_nuscenes):  # noqa: F811
    """Every scene of the tiny synthetic dataset (train and val): 3 scenes of 4 frames."""
    train, val = load_infos(synthetic_nuscenes.train_info), load_infos(synthetic_nuscenes.val_info)
    return InfoSet(version=val.version, samples=[*train.samples, *val.samples])


def _ground_truth_detections(infos: InfoSet, nusc, *, fresh_query_ids: bool):
    """Annotated boxes of the tracked classes as LiDAR-frame detections, and each box's instance token.
    Query ids: one per instance, or a new one in every frame (no query carries an object along)."""
    predictions, instances, next_id = {}, {}, [0]

    def new_id() -> int:
        next_id[0] += 1
        return next_id[0]

    lineage = {}
    for sample in infos.samples:
        keep = np.isin(sample.gt_names, TRACKED)
        tokens = np.array(nusc.get("sample", sample.token)["anns"])[keep]
        instance = [nusc.get("sample_annotation", token)["instance_token"] for token in tokens]
        boxes = sample.gt_boxes[keep].copy()
        boxes[:, 2] -= boxes[:, 5] / 2
        predictions[sample.token] = {
            "boxes_3d": np.concatenate([boxes, np.nan_to_num(sample.gt_velocity[keep])], axis=1),
            "scores_3d": np.full(len(boxes), 0.9),
            "labels_3d": np.array([NUSCENES_CLASSES.index(name) for name in sample.gt_names[keep]]),
            "query_ids_3d": np.array([new_id() if fresh_query_ids else lineage.setdefault(token, new_id())
                                      for token in instance], dtype=np.int64),
        }
        instances[sample.token] = instance
    return predictions, instances


def _switches(infos, instances, track_ids):
    per_instance = {}
    for scene in scenes_in_time_order(infos):
        for sample in scene:
            for instance, track_id in zip(instances[sample.token], track_ids[sample.token]):
                per_instance.setdefault(instance, []).append(int(track_id))
    return identity_switches(per_instance), per_instance


def test_scenes_come_in_time_order(scenes):
    ordered = scenes_in_time_order(scenes)
    assert len(ordered) == 3 and sum(map(len, ordered)) == len(scenes.samples)
    for scene in ordered:
        assert len({sample.scene_token for sample in scene}) == 1
        assert all(a.timestamp < b.timestamp for a, b in zip(scene, scene[1:]))


def test_frames_hold_global_centres(scenes, synthetic_nusc):
    predictions, instances = _ground_truth_detections(scenes, synthetic_nusc, fresh_query_ids=False)
    sample = scenes.samples[1]
    frame = tracking_frames(predictions, scenes, classes=NUSCENES_CLASSES)[sample.token]
    for center, instance in zip(frame.centers, instances[sample.token]):
        tokens = synthetic_nusc.get("sample", sample.token)["anns"]
        annotations = [synthetic_nusc.get("sample_annotation", token) for token in tokens]
        annotation = next(a for a in annotations if a["instance_token"] == instance)
        np.testing.assert_allclose(center, annotation["translation"][:2], atol=1e-4)


@pytest.mark.parametrize("tracker", [
    CenterPointTracker(),
    QueryPropagationTracker(),  # queries change every frame: rematching carries the tracks
], ids=["centerpoint", "query_propagation"])
def test_identities_persist_while_the_ego_moves(scenes, synthetic_nusc, tracker):
    # the ego drives: LiDAR-frame coordinates of the same world point change from frame to frame
    first, second = scenes_in_time_order(scenes)[0][:2]
    ego = [pose_matrix(s.ego2global_rotation, s.ego2global_translation)[:2, 3] for s in (first, second)]
    assert np.linalg.norm(ego[1] - ego[0]) > 1.0
    predictions, instances = _ground_truth_detections(scenes, synthetic_nusc, fresh_query_ids=True)
    track_ids = track_scenes(tracker, predictions, scenes, classes=NUSCENES_CLASSES)
    switches, per_instance = _switches(scenes, instances, track_ids)
    assert switches == 0
    assert all(NOT_TRACKED not in ids for ids in per_instance.values())
    assert len({ids[0] for ids in per_instance.values()}) == len(per_instance)  # one track per instance


def test_query_identity_alone_tracks_when_queries_follow_objects(scenes, synthetic_nusc):
    predictions, instances = _ground_truth_detections(scenes, synthetic_nusc, fresh_query_ids=False)
    for prediction in predictions.values():
        prediction["boxes_3d"][:, 7:9] = 0.0  # no velocities: distance matching could not compensate
    tracker = QueryPropagationTracker(QueryPropagationTrackerParams(rematch=False))
    switches, per_instance = _switches(scenes, instances, track_scenes(tracker, predictions, scenes,
                                                                       classes=NUSCENES_CLASSES))
    assert switches == 0 and len({ids[0] for ids in per_instance.values()}) == len(per_instance)


def test_query_lineages_never_join_across_a_stream_restart(scenes, synthetic_nusc):
    # One query per instance all scene long, but numbered from 0 again in every frame as a restarted
    # detector numbers them: told about the restart at the third frame, the tracker splits the tracks there.
    predictions, instances = _ground_truth_detections(scenes, synthetic_nusc, fresh_query_ids=False)
    scene = scenes_in_time_order(scenes)[0]
    order = sorted({instance for sample in scene for instance in instances[sample.token]})
    for sample in scene:
        ids = [order.index(instance) for instance in instances[sample.token]]
        predictions[sample.token]["query_ids_3d"] = np.array(ids)
    tracker = QueryPropagationTracker(QueryPropagationTrackerParams(rematch=False))
    joined = track_scenes(tracker, predictions, scenes, classes=NUSCENES_CLASSES)
    split = track_scenes(tracker, predictions, scenes, classes=NUSCENES_CLASSES, restarts=[scene[2].token])
    before, after = scene[1].token, scene[2].token
    continuing = set(instances[before]) & set(instances[after])
    assert continuing
    for instance in continuing:
        row_before, row_after = instances[before].index(instance), instances[after].index(instance)
        assert joined[before][row_before] == joined[after][row_after]
        assert split[before][row_before] != split[after][row_after]
