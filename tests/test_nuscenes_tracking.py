"""The nuScenes tracking metric: submission format, the devkit's loader, and ground truth scored as tracks."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)

from streampetr_plugin.data.dataset import NUSCENES_CLASSES
from streampetr_plugin.data.infos import InfoSet, load_infos
from streampetr_plugin.evaluation.nuscenes_tracking import (
    RESULTS_FILE,
    SUMMARY_FILE,
    TRACKING_NAMES,
    evaluate_tracking,
    format_tracking_results,
)
from streampetr_plugin.tracking.frame import NOT_TRACKED


@pytest.fixture(scope="module")
def val_infos(synthetic_nuscenes):  # noqa: F811
    return load_infos(synthetic_nuscenes.val_info)


def _ground_truth_as_tracks(infos: InfoSet, nusc):
    """The info GT as detector output (bottom-centre boxes with velocity), each box's track id the index
    of its annotation's instance (the info rows follow the sample's annotation order)."""
    instances = {}
    predictions, track_ids = {}, {}
    for sample in infos.samples:
        keep = sample.valid_flag & np.isin(sample.gt_names, NUSCENES_CLASSES)
        annotations = np.array(nusc.get("sample", sample.token)["anns"])[keep]
        boxes = sample.gt_boxes[keep].copy()
        boxes[:, 2] -= boxes[:, 5] / 2
        predictions[sample.token] = {
            "boxes_3d": np.concatenate([boxes, np.nan_to_num(sample.gt_velocity[keep])], axis=1),
            "scores_3d": np.linspace(1.0, 0.5, len(boxes)),
            "labels_3d": np.array([NUSCENES_CLASSES.index(name) for name in sample.gt_names[keep]]),
        }
        track_ids[sample.token] = np.array([
            instances.setdefault(nusc.get("sample_annotation", token)["instance_token"], len(instances))
            for token in annotations
        ], dtype=np.int64)
    return predictions, track_ids


def test_tracking_names_are_the_devkits():
    from nuscenes.eval.common.config import config_factory

    assert sorted(TRACKING_NAMES) == sorted(config_factory("tracking_nips_2019").tracking_names)


def test_ground_truth_as_tracks_scores_full_marks(
    tmp_path, synthetic_nuscenes, val_infos, synthetic_nusc, caplog  # noqa: F811
):
    predictions, track_ids = _ground_truth_as_tracks(val_infos, synthetic_nusc)
    with caplog.at_level(logging.INFO, logger="streampetr_plugin.evaluation.nuscenes_tracking"):
        metrics = evaluate_tracking(predictions, track_ids, val_infos, root=synthetic_nuscenes.root,
                                    output_dir=tmp_path)
    assert metrics["AMOTA"] == pytest.approx(1.0)
    assert metrics["MOTA"] == pytest.approx(1.0)
    assert metrics["AMOTP"] < 1e-3
    assert metrics["IDS"] == 0 and metrics["FRAG"] == 0
    scored = [name for name, values in metrics["per_class"].items() if not np.isnan(values["AMOTA"])]
    assert len(scored) >= 3  # the val scene has several tracking classes
    assert all(metrics["per_class"][name]["AMOTA"] == pytest.approx(1.0) for name in scored)
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("AMOTA: ") for message in messages)
    assert any(message.startswith("Object Class") and "AMOTA" in message for message in messages)
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["amota"] == pytest.approx(metrics["AMOTA"])


def test_swapped_ids_count_as_switches(tmp_path, synthetic_nuscenes, val_infos, synthetic_nusc):  # noqa: F811
    predictions, track_ids = _ground_truth_as_tracks(val_infos, synthetic_nusc)
    last = val_infos.samples[-1].token
    names = np.array([NUSCENES_CLASSES[label] for label in predictions[last]["labels_3d"]])
    counts = {name: int(np.sum(names == name)) for name in TRACKING_NAMES}
    swapped = max(counts, key=counts.get)
    rows = np.flatnonzero(names == swapped)
    assert len(rows) >= 2
    # in the last frame the objects of one class pass their ids round: each continuing track switches
    track_ids[last] = track_ids[last].copy()
    track_ids[last][rows] = np.roll(track_ids[last][rows], 1)
    metrics = evaluate_tracking(predictions, track_ids, val_infos, root=synthetic_nuscenes.root,
                                output_dir=tmp_path)
    assert metrics["per_class"][swapped]["IDS"] >= 1
    assert metrics["per_class"][swapped]["MOTA"] < 1.0
    assert metrics["per_class"][swapped]["AMOTA"] < 1.0


def test_without_a_tracked_box_every_metric_is_at_its_worst(
    tmp_path, synthetic_nuscenes, val_infos, synthetic_nusc  # noqa: F811
):
    predictions, track_ids = _ground_truth_as_tracks(val_infos, synthetic_nusc)
    untracked = {token: np.full_like(ids, NOT_TRACKED) for token, ids in track_ids.items()}
    metrics = evaluate_tracking(predictions, untracked, val_infos, root=synthetic_nuscenes.root,
                                output_dir=tmp_path)
    assert metrics["AMOTA"] == 0.0 and metrics["MOTA"] == 0.0 and metrics["RECALL"] == 0.0
    assert metrics["AMOTP"] == 2.0  # the devkit's worst: its 2 m match distance
    assert metrics["IDS"] == 0 and metrics["FRAG"] == 0
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["amota"] == 0.0


def test_submission_is_in_scene_order_and_loads_with_the_devkit(tmp_path, val_infos, synthetic_nusc):
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.common.loaders import load_prediction
    from nuscenes.eval.tracking.data_classes import TrackingBox

    config_factory("tracking_nips_2019")  # the devkit learns its tracking class names from the configuration

    predictions, track_ids = _ground_truth_as_tracks(val_infos, synthetic_nusc)
    first = val_infos.samples[0].token
    track_ids[first] = track_ids[first].copy()
    track_ids[first][0] = NOT_TRACKED
    submission = format_tracking_results(predictions, track_ids, val_infos)
    tokens = list(submission["results"])
    timestamps = [synthetic_nusc.get("sample", token)["timestamp"] for token in tokens]
    scenes = [synthetic_nusc.get("sample", token)["scene_token"] for token in tokens]
    assert set(tokens) == {sample.token for sample in val_infos.samples}
    pairs = zip(zip(scenes, timestamps), zip(scenes[1:], timestamps[1:]))
    assert all(scene != later_scene or time < later for (scene, time), (later_scene, later) in pairs)
    records = [record for per_sample in submission["results"].values() for record in per_sample]
    assert {record["tracking_name"] for record in records} <= set(TRACKING_NAMES)
    tracked_boxes = sum(
        int(np.sum((track_ids[s.token] != NOT_TRACKED)
                   & np.isin([NUSCENES_CLASSES[label] for label in predictions[s.token]["labels_3d"]],
                             TRACKING_NAMES)))
        for s in val_infos.samples
    )
    assert len(records) == tracked_boxes  # untracked boxes and non-tracking classes are left out
    path = tmp_path / RESULTS_FILE
    path.write_text(json.dumps(submission))
    boxes, meta = load_prediction(str(path), 500, TrackingBox, verbose=False)
    assert meta["use_camera"] is True
    assert sorted(boxes.sample_tokens) == sorted(tokens)
    assert sum(len(boxes[token]) for token in boxes.sample_tokens) == len(records)


def test_track_ids_must_cover_every_box(val_infos, synthetic_nusc):
    predictions, track_ids = _ground_truth_as_tracks(val_infos, synthetic_nusc)
    token = val_infos.samples[1].token
    track_ids[token] = track_ids[token][:-1]
    with pytest.raises(ValueError, match="track ids"):
        format_tracking_results(predictions, track_ids, val_infos)
