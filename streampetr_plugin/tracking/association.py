"""Greedy, velocity-compensated centre-distance association (the CenterPoint scheme)."""
from __future__ import annotations

from typing import List, Mapping, Tuple

import numpy as np


def compensated_distances(
    *,
    centers: np.ndarray,
    velocities: np.ndarray,
    names: np.ndarray,
    track_centers: np.ndarray,
    track_names: np.ndarray,
    time_lag: float,
    max_distance: Mapping[str, float],
) -> np.ndarray:
    """BEV distances (N, M) from each detection, moved back by its own velocity over ``time_lag`` seconds
    (where it was at the previous frame), to each track's last centre; ``inf`` where the classes differ
    or the distance exceeds the detection's class gate ``max_distance[name]`` (m).

    ``centers``, ``velocities`` (N, 2), ``names`` (N,) of the detections; ``track_centers`` (M, 2) and
    ``track_names`` (M,) of the tracks, all in one (global) frame.
    """
    previous = centers - velocities * time_lag  # (N, 2)
    distances = np.linalg.norm(previous[:, None, :] - track_centers[None, :, :], axis=-1)  # (N, M)
    gates = np.array([max_distance.get(str(name), -np.inf) for name in names], dtype=np.float64)
    valid = (names[:, None] == track_names[None, :]) & (distances <= gates[:, None])
    return np.where(valid, distances, np.inf)


def greedy_assignment(distances: np.ndarray) -> List[Tuple[int, int]]:
    """Pairs (row, column): rows in order (put the best detection first) each take the nearest column
    no earlier row took, where that distance is finite."""
    taken = np.zeros(distances.shape[1], dtype=bool)
    pairs = []
    for row in range(distances.shape[0]):
        free = np.where(taken, np.inf, distances[row])
        if free.size == 0:
            break
        column = int(np.argmin(free))
        if np.isfinite(free[column]):
            taken[column] = True
            pairs.append((row, column))
    return pairs
