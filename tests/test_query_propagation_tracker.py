"""The query-propagation tracker: track ids follow the propagated queries."""
from __future__ import annotations

import pytest
from tracking_helpers import identity_switches, make_frame

from streampetr_plugin.tracking.frame import NOT_TRACKED
from streampetr_plugin.tracking.query_propagation import (
    MissingQueryIdsError,
    QueryPropagationTracker,
    QueryPropagationTrackerParams,
)


def test_a_propagated_query_keeps_its_track_wherever_its_box_goes():
    tracker = QueryPropagationTracker(QueryPropagationTrackerParams(rematch=False))
    ids = {"a": [], "b": []}
    # the boxes of queries 7 and 9 jump 20 m every frame, far beyond any distance gate
    for k in range(4):
        out = tracker.update(make_frame(k, [[20.0 * k, 0.0], [-20.0 * k, 5.0]], query_ids=[7, 9]))
        ids["a"].append(int(out[0]))
        ids["b"].append(int(out[1]))
    assert NOT_TRACKED not in ids["a"] + ids["b"]
    assert identity_switches(ids) == 0 and ids["a"][0] != ids["b"][0]


def test_identity_beats_distance_in_a_crossing():
    # Two queries swap places without velocity: centre distance alone would swap the tracks (see the
    # CenterPoint tests); the queries carry their objects through.
    tracker = QueryPropagationTracker()
    ids = {"a": [], "b": []}
    for k in range(4):
        out = tracker.update(make_frame(k, [[-6.0 + 4.0 * k, 0.0], [6.0 - 4.0 * k, 1.0]], query_ids=[1, 2],
                                        scores=[0.9, 0.8]))
        ids["a"].append(int(out[0]))
        ids["b"].append(int(out[1]))
    assert identity_switches(ids) == 0


def test_a_new_query_takes_over_a_track_only_with_rematch():
    frames = [make_frame(0, [[0.0, 0.0]], query_ids=[3]), make_frame(1, [[0.5, 0.0]], query_ids=[4])]
    with_rematch = QueryPropagationTracker(QueryPropagationTrackerParams(rematch=True))
    first, second = (with_rematch.update(frame)[0] for frame in frames)
    assert first == second
    without = QueryPropagationTracker(QueryPropagationTrackerParams(rematch=False))
    first, second = (without.update(frame)[0] for frame in frames)
    assert first != second and second != NOT_TRACKED  # a new track starts


def test_unmatched_low_scoring_queries_start_no_track():
    tracker = QueryPropagationTracker(QueryPropagationTrackerParams(birth_score=0.4))
    out = tracker.update(make_frame(0, [[0.0, 0.0], [9.0, 0.0]], query_ids=[1, 2], scores=[0.5, 0.3]))
    assert out[0] != NOT_TRACKED and out[1] == NOT_TRACKED
    # once it leads a track, the query keeps it at a lower score
    assert tracker.update(make_frame(1, [[0.0, 0.0]], query_ids=[1], scores=[0.3]))[0] == out[0]


def test_one_query_detected_as_two_classes_leads_two_tracks():
    tracker = QueryPropagationTracker()
    out = tracker.update(make_frame(0, [[0.0, 0.0], [0.0, 0.0]], names=["car", "truck"], query_ids=[5, 5]))
    again = tracker.update(make_frame(1, [[0.0, 0.0], [0.0, 0.0]], names=["car", "truck"], query_ids=[5, 5]))
    assert out[0] != out[1] and list(again) == list(out)


def test_a_track_ends_max_age_frames_after_its_query_was_last_seen():
    tracker = QueryPropagationTracker(QueryPropagationTrackerParams(max_age=1, rematch=False))
    first = tracker.update(make_frame(0, [[0.0, 0.0]], query_ids=[1]))[0]
    tracker.update(make_frame(1, [], query_ids=[]))
    assert tracker.update(make_frame(2, [[0.0, 0.0]], query_ids=[1]))[0] == first
    tracker.update(make_frame(3, [], query_ids=[]))
    tracker.update(make_frame(4, [], query_ids=[]))
    assert tracker.update(make_frame(5, [[0.0, 0.0]], query_ids=[1]))[0] not in (first, NOT_TRACKED)


def test_detections_without_query_ids_are_an_error():
    with pytest.raises(MissingQueryIdsError, match="centerpoint"):
        QueryPropagationTracker().update(make_frame(0, [[0.0, 0.0]]))
