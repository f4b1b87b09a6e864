"""Greedy, velocity-compensated centre-distance association."""
from __future__ import annotations

import numpy as np

from streampetr_plugin.tracking.association import compensated_distances, greedy_assignment


def test_greedy_assignment_serves_rows_in_order_and_never_takes_infinite_pairs():
    distances = np.array([[1.0, 0.5, np.inf],
                          [0.2, 0.4, np.inf],
                          [np.inf, 0.1, np.inf]])
    # row 0 takes column 1 (its nearest), row 1 the nearest left (column 0), row 2 finds its only
    # finite column taken
    assert greedy_assignment(distances) == [(0, 1), (1, 0)]
    assert greedy_assignment(np.zeros((3, 0))) == []
    assert greedy_assignment(np.full((2, 2), np.inf)) == []


def test_distances_move_detections_back_by_their_velocity_and_gate_per_class():
    centers = np.array([[10.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    velocities = np.array([[4.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    names = np.array(["car", "car", "pedestrian"])
    track_centers = np.array([[8.0, 0.0], [0.0, 5.5]])
    track_names = np.array(["car", "pedestrian"])
    distances = compensated_distances(
        centers=centers, velocities=velocities, names=names, track_centers=track_centers,
        track_names=track_names, time_lag=0.5, max_distance={"car": 1.5, "pedestrian": 1.0},
    )
    assert distances.shape == (3, 2)
    assert distances[0, 0] == 0.0  # (10, 0) - 4 m/s * 0.5 s = (8, 0): exactly on the track
    assert np.isinf(distances[1, 0])  # 2 m without velocity: beyond the car gate
    assert np.isinf(distances[0, 1]) and np.isinf(distances[2, 0])  # other class
    assert distances[2, 1] == np.float64(0.5)


def test_classes_without_a_gate_match_nothing():
    distances = compensated_distances(
        centers=np.zeros((1, 2)), velocities=np.zeros((1, 2)), names=np.array(["barrier"]),
        track_centers=np.zeros((1, 2)), track_names=np.array(["barrier"]), time_lag=0.5,
        max_distance={"car": 4.0},
    )
    assert np.isinf(distances).all()
