"""LIDAR_TOP point clouds: ground rings plus points on every annotated box, and per-box point counts."""
from __future__ import annotations

import math

import numpy as np

from ..geometry import invert_rigid, transform_points

LIDAR_HEIGHT_M = 1.84  # LIDAR_TOP above the ground (z = 0), as mounted on the nuScenes car


def lidar_points(
    rng: np.random.Generator,
    lidar2global: np.ndarray,
    centers: np.ndarray,
    sizes_lwh: np.ndarray,
    yaws: np.ndarray,
) -> np.ndarray:
    """Point cloud (N, 5) float32 in the LiDAR frame: ground rings plus points on each box's surfaces."""
    radii = np.geomspace(3.0, 60.0, 10)
    angles = np.linspace(-math.pi, math.pi, 48, endpoint=False)
    ring_r, ring_a = np.meshgrid(radii, angles, indexing="ij")
    lidar_position = lidar2global[:3, 3]
    ground = np.stack(
        [lidar_position[0] + (ring_r * np.cos(ring_a)).ravel(),
         lidar_position[1] + (ring_r * np.sin(ring_a)).ravel(),
         np.full(ring_r.size, -0.02)], axis=-1,
    )
    ground_rings = np.repeat(np.arange(len(radii)), len(angles)).astype(np.float64)
    clouds, rings = [ground], [ground_rings]
    for center, size, yaw in zip(centers, sizes_lwh, yaws):
        distance = max(float(np.linalg.norm(center[:2] - lidar_position[:2])), 3.0)
        count = int(np.clip(1000.0 * (size[0] + size[1]) * size[2] / distance**2, 3, 150))
        # Uniform points on the box surface, 2 cm inside it: pick a face axis and pin it to +-1.
        local = rng.uniform(-1.0, 1.0, size=(count, 3))
        axis = rng.integers(0, 3, size=count)
        local[np.arange(count), axis] = rng.choice([-1.0, 1.0], size=count)
        local[:, 2] = np.maximum(local[:, 2], -0.9)  # nothing under the box
        local *= size / 2.0 - 0.02
        cos, sin = math.cos(yaw), math.sin(yaw)
        points = np.stack(
            [
                center[0] + cos * local[:, 0] - sin * local[:, 1],
                center[1] + sin * local[:, 0] + cos * local[:, 1],
                center[2] + local[:, 2],
            ],
            axis=-1,
        )
        clouds.append(points)
        rings.append(np.full(count, float(len(radii))))
    points_global = np.concatenate(clouds)
    points_lidar = transform_points(invert_rigid(lidar2global), points_global)
    intensity = rng.uniform(0.0, 100.0, size=len(points_lidar))
    return np.concatenate(
        [points_lidar, intensity[:, None], np.concatenate(rings)[:, None]], axis=1
    ).astype(np.float32)


def count_points_in_boxes(
    points: np.ndarray, centers: np.ndarray, sizes_lwh: np.ndarray, yaws: np.ndarray
) -> np.ndarray:
    """Number of points (N, 3) inside each box (inclusive bounds, as the devkit's ``points_in_box``)."""
    counts = np.zeros(len(centers), dtype=np.int64)
    for i, (center, size, yaw) in enumerate(zip(centers, sizes_lwh, yaws)):
        offset = points - center
        cos, sin = math.cos(yaw), math.sin(yaw)
        along = offset[:, 0] * cos + offset[:, 1] * sin
        across = -offset[:, 0] * sin + offset[:, 1] * cos
        inside = (np.abs(along) <= size[0] / 2) & (np.abs(across) <= size[1] / 2)
        inside &= np.abs(offset[:, 2]) <= size[2] / 2
        counts[i] = int(inside.sum())
    return counts
