"""Rigid-transform helpers shared by the nuScenes data code (numpy, float64 unless stated).

Quaternions follow the nuScenes convention ``(w, x, y, z)``; 4x4 matrices map column vectors
(``p_out = M @ [p, 1]``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def quaternion_to_matrix(quaternion: Sequence[float]) -> np.ndarray:
    """Rotation matrix (3, 3) of a unit quaternion ``(w, x, y, z)`` (normalised first)."""
    w, x, y, z = np.asarray(quaternion, dtype=np.float64) / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion ``(w, x, y, z)`` with ``w >= 0`` of a rotation matrix (3, 3)."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = np.trace(m)
    # Shepperd's method: divide by the largest of the four candidate components for stability.
    candidates = np.array([trace, m[0, 0], m[1, 1], m[2, 2]])
    k = int(np.argmax(candidates))
    if k == 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    quaternion = np.array(q)
    quaternion /= np.linalg.norm(quaternion)
    return quaternion if quaternion[0] >= 0 else -quaternion


def yaw_to_quaternion(yaw: float) -> np.ndarray:
    """Quaternion ``(w, x, y, z)`` of a rotation by ``yaw`` radians about +z."""
    return np.array([np.cos(yaw / 2.0), 0.0, 0.0, np.sin(yaw / 2.0)])


def quaternion_yaw(quaternion: Sequence[float]) -> float:
    """Yaw (rotation about +z, radians) of a quaternion, as the devkit's ``yaw_pitch_roll[0]``."""
    w, x, y, z = np.asarray(quaternion, dtype=np.float64) / np.linalg.norm(quaternion)
    return float(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


def rigid_matrix(rotation: np.ndarray, translation: Sequence[float], dtype=np.float64) -> np.ndarray:
    """4x4 transform ``[R t; 0 1]`` from a (3, 3) rotation and a translation (3,)."""
    matrix = np.eye(4, dtype=dtype)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation
    return matrix


def pose_matrix(quaternion: Sequence[float], translation: Sequence[float], dtype=np.float64) -> np.ndarray:
    """4x4 transform from a nuScenes ``rotation`` quaternion and ``translation``."""
    return rigid_matrix(quaternion_to_matrix(quaternion), translation, dtype=dtype)


def invert_rigid(matrix: np.ndarray) -> np.ndarray:
    """Inverse ``[R^T, -R^T t]`` of a rigid 4x4 transform, in the input's dtype."""
    rotation = matrix[:3, :3]
    inverse = np.eye(4, dtype=matrix.dtype)
    inverse[:3, :3] = rotation.T
    inverse[:3, 3] = -rotation.T @ matrix[:3, 3]
    return inverse


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to points (..., 3); returns (..., 3)."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def box_corners(centers: np.ndarray, sizes: np.ndarray, yaws: np.ndarray) -> np.ndarray:
    """Corners (M, 8, 3) of boxes with gravity ``centers`` (M, 3), ``sizes`` (M, 3) as (length along
    heading, width, height) and ``yaws`` (M,) about +z. Corner order: the four bottom corners
    counter-clockwise from (+l/2, +w/2), then the four top corners in the same order."""
    unit = np.array(
        [[1, 1, -1], [-1, 1, -1], [-1, -1, -1], [1, -1, -1], [1, 1, 1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1]],
        dtype=np.float64,
    )
    local = unit[None] * (np.asarray(sizes, dtype=np.float64)[:, None, :] / 2.0)  # (M, 8, 3)
    cos, sin = np.cos(yaws)[:, None], np.sin(yaws)[:, None]
    rotated = np.stack(
        [cos * local[..., 0] - sin * local[..., 1], sin * local[..., 0] + cos * local[..., 1], local[..., 2]],
        axis=-1,
    )
    return rotated + np.asarray(centers, dtype=np.float64)[:, None, :]
