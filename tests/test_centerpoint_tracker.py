"""The CenterPoint tracker: association, identity through a crossing, birth and death."""
from __future__ import annotations

import numpy as np
import pytest
from tracking_helpers import FRAME_SECONDS, identity_switches, make_frame

from streampetr_plugin.tracking.centerpoint import CenterPointTracker, CenterPointTrackerParams
from streampetr_plugin.tracking.frame import NOT_TRACKED


def _crossing(tracker, *, with_velocity: bool):
    """Two cars drive towards each other 1 m apart sideways at 8 m/s (4 m per frame) and pass."""
    speed = 4.0 / FRAME_SECONDS
    ids = {"a": [], "b": []}
    for k in range(4):
        a, b = [-6.0 + 4.0 * k, 0.0], [6.0 - 4.0 * k, 1.0]
        velocities = [[speed, 0.0], [-speed, 0.0]] if with_velocity else None
        out = tracker.update(make_frame(k, [a, b], velocities=velocities, scores=[0.9, 0.8]))
        ids["a"].append(int(out[0]))
        ids["b"].append(int(out[1]))
    return ids


def test_velocity_compensation_keeps_identities_through_a_crossing():
    ids = _crossing(CenterPointTracker(), with_velocity=True)
    assert identity_switches(ids) == 0
    assert ids["a"][0] != ids["b"][0]


def test_without_velocities_the_crossing_swaps_identities():
    # At frame 2 each car is 1 m from the other's last centre and 4 m from its own: matching centres
    # without motion hands each the other's track (a switch for both, once).
    ids = _crossing(CenterPointTracker(), with_velocity=False)
    assert identity_switches(ids) >= 2


def test_tracks_are_per_class():
    tracker = CenterPointTracker()
    first = tracker.update(make_frame(0, [[0.0, 0.0]], names=["car"]))
    second = tracker.update(make_frame(1, [[0.0, 0.0]], names=["truck"]))
    assert first[0] != NOT_TRACKED and second[0] != NOT_TRACKED and first[0] != second[0]


def test_birth_needs_the_birth_score_and_low_scores_are_ignored():
    tracker = CenterPointTracker(CenterPointTrackerParams(score_threshold=0.2, birth_score=0.5))
    out = tracker.update(make_frame(0, [[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]], scores=[0.6, 0.3, 0.1]))
    assert out[0] != NOT_TRACKED and out[1] == NOT_TRACKED and out[2] == NOT_TRACKED
    # a low-scoring detection still continues a track that exists
    again = tracker.update(make_frame(1, [[0.2, 0.0]], scores=[0.3]))
    assert again[0] == out[0]
    # below score_threshold it does not, and the track is not output
    assert tracker.update(make_frame(2, [[0.2, 0.0]], scores=[0.15]))[0] == NOT_TRACKED


def test_untracked_classes_get_no_track():
    out = CenterPointTracker().update(make_frame(0, [[0.0, 0.0]], names=["barrier"]))
    assert out[0] == NOT_TRACKED


@pytest.mark.parametrize("gap", [1, 2, 3, 4])
def test_a_track_coasts_max_age_frames_then_ends(gap):
    max_age = 3
    # 5 m per frame: one frame unseen puts the car beyond the 4 m gate around where it was last
    # detected; the track coasts along with it
    speed = 5.0 / FRAME_SECONDS
    tracker = CenterPointTracker(CenterPointTrackerParams(max_age=max_age))
    first = tracker.update(make_frame(0, [[0.0, 0.0]], velocities=[[speed, 0.0]]))[0]
    for k in range(1, gap + 1):  # the car goes unseen for `gap` frames
        assert tracker.update(make_frame(k, [], velocities=[])).shape == (0,)
    k = gap + 1
    reappeared = tracker.update(make_frame(k, [[5.0 * k, 0.0]], velocities=[[speed, 0.0]]))[0]
    assert (reappeared == first) == (gap <= max_age)
    assert reappeared != NOT_TRACKED


def test_reset_ends_every_track_and_ids_are_not_reused():
    tracker = CenterPointTracker()
    first = tracker.update(make_frame(0, [[0.0, 0.0]]))[0]
    tracker.reset()
    again = tracker.update(make_frame(1, [[0.0, 0.0]]))[0]
    assert again != first
    assert np.all(tracker.update(make_frame(2, [[0.0, 0.0]])) == again)
