"""The world of one scene: object classes, the ego's path and objects placed beside it without
overlaps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from ..geometry import pose_matrix, yaw_to_quaternion

EGO_HALF_EXTENT = np.array([2.4, 1.0])  # (length / 2, width / 2) of the ego footprint, m
EGO_FOOTPRINT_CENTER_X = 1.3  # ego footprint centre ahead of the ego origin (rear axle), m


@dataclass(frozen=True)
class ClassSpec:
    """One detection class: its nuScenes category, size, colour, frequency and how it moves."""

    category: str  # nuScenes category name
    detection_name: str
    size_wlh: Tuple[float, float, float]  # devkit order: width, length, height
    colour: Tuple[int, int, int]  # RGB
    weight: float  # relative frequency
    moving_probability: float
    speed_range: Tuple[float, float]  # m/s when moving
    placement: str  # "lane", "bike", "walk", "roadside"


CLASSES: Tuple[ClassSpec, ...] = (
    ClassSpec("vehicle.car", "car", (1.95, 4.62, 1.73), (40, 90, 230), 0.30, 0.5, (4.0, 12.0), "lane"),
    ClassSpec("vehicle.truck", "truck", (2.52, 6.94, 2.84), (245, 140, 20), 0.07, 0.4, (4.0, 10.0), "lane"),
    ClassSpec("vehicle.construction", "construction_vehicle", (2.85, 6.37, 3.19), (235, 220, 30), 0.03,
              0.2, (1.0, 4.0), "lane"),
    ClassSpec("vehicle.bus.rigid", "bus", (2.94, 11.0, 3.47), (220, 30, 40), 0.04, 0.5, (4.0, 10.0), "lane"),
    ClassSpec("vehicle.trailer", "trailer", (2.90, 12.29, 3.87), (130, 80, 40), 0.03, 0.3, (4.0, 9.0),
              "lane"),
    ClassSpec("movable_object.barrier", "barrier", (2.53, 0.50, 0.98), (235, 235, 235), 0.09, 0.0,
              (0.0, 0.0), "roadside"),
    ClassSpec("vehicle.motorcycle", "motorcycle", (0.77, 2.11, 1.47), (220, 40, 220), 0.05, 0.5, (3.0, 9.0),
              "bike"),
    ClassSpec("vehicle.bicycle", "bicycle", (0.60, 1.70, 1.28), (30, 220, 230), 0.06, 0.5, (2.0, 5.0),
              "bike"),
    ClassSpec("human.pedestrian.adult", "pedestrian", (0.67, 0.73, 1.77), (40, 200, 60), 0.22, 0.6,
              (0.8, 1.6), "walk"),
    ClassSpec("movable_object.trafficcone", "traffic_cone", (0.41, 0.41, 1.07), (255, 90, 0), 0.11, 0.0,
              (0.0, 0.0), "roadside"),
)
CLASS_COLOURS: Dict[str, Tuple[int, int, int]] = {spec.detection_name: spec.colour for spec in CLASSES}


@dataclass
class SceneObject:
    """An object of one scene, moving on a straight line at constant speed (or parked)."""

    spec: ClassSpec
    anchor: np.ndarray  # (2,) global BEV position at time anchor_time
    anchor_time: float  # s from scene start
    velocity: np.ndarray  # (2,) global m/s
    yaw: float

    def positions(self, times: np.ndarray) -> np.ndarray:
        """BEV centres (T, 2) at ``times`` (T,) seconds."""
        return self.anchor[None] + self.velocity[None] * (times[:, None] - self.anchor_time)

    @property
    def size_lwh(self) -> np.ndarray:
        """(length, width, height) in metres."""
        width, length, height = self.spec.size_wlh
        return np.array([length, width, height])

    @property
    def half_extent(self) -> np.ndarray:
        width, length, _ = self.spec.size_wlh
        return np.array([length / 2.0, width / 2.0])


@dataclass(frozen=True)
class EgoMotion:
    """The ego's path: a circular arc at constant speed and yaw rate (a line when the rate is 0)."""

    origin: np.ndarray  # (2,) global BEV position at t = 0
    heading: float  # rad at t = 0
    speed: float  # m/s
    yaw_rate: float  # rad/s

    def pose(self, t: float) -> Tuple[np.ndarray, float]:
        """Global BEV position (2,) and yaw of the ego origin at ``t`` seconds."""
        if abs(self.yaw_rate) < 1e-9:
            offset = self.speed * t * np.array([math.cos(self.heading), math.sin(self.heading)])
        else:
            radius = self.speed / self.yaw_rate
            heading_t = self.heading + self.yaw_rate * t
            offset = radius * np.array(
                [math.sin(heading_t) - math.sin(self.heading), math.cos(self.heading) - math.cos(heading_t)]
            )
        return self.origin + offset, self.heading + self.yaw_rate * t

    def matrix(self, t: float) -> np.ndarray:
        """Ego -> global 4x4 transform at ``t`` seconds."""
        position, yaw = self.pose(t)
        return pose_matrix(yaw_to_quaternion(yaw), [position[0], position[1], 0.0])


def _heading_axes(yaw: np.ndarray) -> np.ndarray:
    """Unit (forward, left) axes (T, 2, 2) of rectangles with headings ``yaw`` (T,)."""
    cos, sin = np.cos(yaw), np.sin(yaw)
    return np.stack([np.stack([cos, sin], axis=-1), np.stack([-sin, cos], axis=-1)], axis=1)


def _footprints_overlap(
    center_a: np.ndarray, yaw_a: np.ndarray, half_a: np.ndarray,
    center_b: np.ndarray, yaw_b: np.ndarray, half_b: np.ndarray, margin: float,
) -> bool:
    """Whether two oriented rectangles overlap at any of T instants (separating-axis test).

    ``center_*`` (T, 2), ``yaw_*`` (T,), ``half_*`` (2,) half length / half width, grown by ``margin``.
    """
    axes_a, axes_b = _heading_axes(yaw_a), _heading_axes(yaw_b)
    half_a = half_a + margin
    half_b = half_b + margin
    delta = center_b - center_a  # (T, 2)
    separated = np.zeros(len(delta), dtype=bool)
    for axis in np.concatenate([axes_a, axes_b], axis=1).transpose(1, 0, 2):  # 4 x (T, 2)
        radius_a = np.abs(np.einsum("tij,tj->ti", axes_a, axis)) @ half_a
        radius_b = np.abs(np.einsum("tij,tj->ti", axes_b, axis)) @ half_b
        separated |= np.abs(np.einsum("tj,tj->t", delta, axis)) > radius_a + radius_b
    return bool((~separated).any())


def _place_object(
    rng: np.random.Generator, spec: ClassSpec, ego: EgoMotion, times: np.ndarray, near: bool
) -> SceneObject:
    """Draw one object of class ``spec`` beside the ego path (``near``: close to it, within the scene)."""
    margin = 0.0 if near else 4.0  # seconds before / after the scene
    anchor_time = float(rng.uniform(times[0] - margin, times[-1] + margin))
    position, heading = ego.pose(anchor_time)
    forward = np.array([math.cos(heading), math.sin(heading)])
    left = np.array([-forward[1], forward[0]])
    side = float(rng.choice([-1.0, 1.0]))
    moving = rng.uniform() < spec.moving_probability
    yaw = heading
    if spec.placement == "lane":
        lateral = side * (rng.choice([3.6, 7.2]) if moving else rng.uniform(9.5, 24.0))
        if moving and side < 0:
            yaw = heading + math.pi  # oncoming traffic drives on the other side
        elif not moving:
            yaw = heading + float(rng.choice([0.0, math.pi, math.pi / 2])) + rng.normal(0, 0.1)
    elif spec.placement == "bike":
        lateral = side * (5.4 if moving else rng.uniform(9.5, 14.0))
        yaw = heading + (math.pi if side < 0 else 0.0) + (0.0 if moving else rng.normal(0, 0.5))
    elif spec.placement == "walk":
        lateral = side * rng.uniform(9.5, 14.0 if near else 28.0)
        if moving:
            yaw = heading + float(rng.choice([0.0, math.pi])) + rng.normal(0, 0.3)
        else:
            yaw = rng.uniform(-math.pi, math.pi)
    else:  # roadside barriers and cones
        lateral = side * rng.uniform(8.0, 9.2)
        yaw = heading + rng.normal(0, 0.05)
    forward_offset = rng.uniform(-5.0, 12.0) if near else rng.uniform(-12.0, 30.0)
    anchor = position + forward_offset * forward + lateral * left
    speed = rng.uniform(*spec.speed_range) if moving else 0.0
    velocity = speed * np.array([math.cos(yaw), math.sin(yaw)])
    return SceneObject(spec, anchor, anchor_time, velocity, float(yaw))


def spawn_objects(
    rng: np.random.Generator, ego: EgoMotion, times: np.ndarray, count: int, uniform_classes: bool
) -> List[SceneObject]:
    """Place up to ``count`` objects around the ego path without overlaps at any key frame.

    Classes are drawn with nuScenes-like frequencies, or all equally often with ``uniform_classes``.
    """
    weights = np.array([1.0 if uniform_classes else spec.weight for spec in CLASSES])
    weights /= weights.sum()
    ego_poses = [ego.pose(t) for t in times]
    ego_yaws = np.array([yaw for _, yaw in ego_poses])
    ego_centers = np.stack(
        [pos + EGO_FOOTPRINT_CENTER_X * np.array([math.cos(yaw), math.sin(yaw)]) for pos, yaw in ego_poses]
    )
    objects: List[SceneObject] = []
    for _ in range(count * 20):
        if len(objects) == count:
            break
        # Every class first, close to the ego path (so each scene evaluates every class), then at random.
        missing = [spec for spec in CLASSES if all(obj.spec is not spec for obj in objects)]
        spec = missing[0] if missing else CLASSES[rng.choice(len(CLASSES), p=weights)]
        candidate = _place_object(rng, spec, ego, times, near=bool(missing))
        centers, yaws = candidate.positions(times), np.full(len(times), candidate.yaw)
        half_extent = candidate.half_extent
        if _footprints_overlap(ego_centers, ego_yaws, EGO_HALF_EXTENT, centers, yaws, half_extent, 0.8):
            continue
        if any(
            _footprints_overlap(other.positions(times), np.full(len(times), other.yaw), other.half_extent,
                                centers, yaws, half_extent, 0.3)
            for other in objects
        ):
            continue
        objects.append(candidate)
    return objects
