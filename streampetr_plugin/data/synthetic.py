"""A small synthetic dataset in the exact nuScenes format, rendered so that 3D boxes are learnable.

:func:`make_synthetic` writes ``<out_dir>/<version>/*.json`` (all 13 nuScenes tables),
``samples/CAM_*/*.jpg``, ``samples/LIDAR_TOP/*.pcd.bin`` and ``maps/*.png``, which
``nuscenes.NuScenes(version, dataroot=out_dir)`` loads unchanged. The world:

- flat ground (z = 0 in the global frame) with a 5 m checkerboard, so ego motion is visible;
- an ego vehicle driving a smooth arc (constant speed and yaw rate per scene, some scenes parked);
- objects of the ten detection classes with nuScenes-typical sizes: moving ones on straight lines at
  constant speed (so the devkit's finite-difference velocity is exact), parked ones still; no two
  footprints overlap at any key frame, none overlaps the ego;
- six cameras with nuScenes-like extrinsics and intrinsics scaled to ``image_size``, each firing at
  its own small offset from the LiDAR time with its own ego pose (as in nuScenes);
- images rendered by pinhole projection of the box faces (near-plane clipped, back faces culled),
  painted far to near so nearer objects occlude farther ones; each class has its own colour and
  each face its own shade (front brightest), so class, extent and heading are all visible;
- LIDAR_TOP ``.pcd.bin`` files (N, 5) float32 with ground rings and points on every annotated box,
  so every annotation has ``num_lidar_pts > 0``;
- attributes consistent with motion (``vehicle.moving`` / ``vehicle.parked`` / ...), visibility
  bins from the rendered occlusion.

Scene names are taken from nuscenes-devkit's official splits (``mini_train`` / ``mini_val`` for
``v1.0-mini``, ``train`` / ``val`` for ``v1.0-trainval``) so the devkit's split logic works unchanged.
Everything is a deterministic function of ``seed``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import shapely.geometry
from PIL import Image, ImageDraw

from .geometry import (
    box_corners,
    invert_rigid,
    matrix_to_quaternion,
    pose_matrix,
    rigid_matrix,
    transform_points,
    yaw_to_quaternion,
)

__all__ = ["SyntheticDataset", "make_synthetic", "synthetic_version", "CLASS_COLOURS"]

FULL_WIDTH, FULL_HEIGHT = 1600, 900
KEYFRAME_INTERVAL_US = 500_000
FIRST_TIMESTAMP_US = 1_533_151_603_547_590
NEAR_PLANE_M = 0.1
LIDAR_HEIGHT_M = 1.84
EGO_HALF_EXTENT = np.array([2.4, 1.0])  # (length / 2, width / 2) of the ego footprint, m
EGO_FOOTPRINT_CENTER_X = 1.3  # ego footprint centre ahead of the ego origin (rear axle), m


@dataclass(frozen=True)
class _CameraSpec:
    channel: str
    yaw_deg: float  # optical axis heading in the ego frame
    translation: Tuple[float, float, float]  # camera -> ego, m
    focal: float  # pixels at 1600 x 900
    principal: Tuple[float, float]  # (cx, cy) at 1600 x 900


# Close to the nuScenes calibration of scene-0061 (values rounded).
_CAMERAS: Tuple[_CameraSpec, ...] = (
    _CameraSpec("CAM_FRONT", 0.0, (1.70, 0.016, 1.51), 1266.4, (816.3, 491.5)),
    _CameraSpec("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.50), 1260.8, (808.0, 495.3)),
    _CameraSpec("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1272.6, (826.6, 479.8)),
    _CameraSpec("CAM_BACK", 180.0, (0.03, 0.003, 1.58), 809.2, (829.2, 481.8)),
    _CameraSpec("CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.56), 1256.7, (817.8, 452.0)),
    _CameraSpec("CAM_BACK_RIGHT", -110.0, (1.03, -0.48, 1.57), 1259.5, (807.3, 501.2)),
)
# Camera trigger offsets from the LiDAR time, microseconds (nuScenes cameras fire as the LiDAR sweeps by).
_CAMERA_OFFSETS_US = (12_000, 20_500, 4_000, 45_000, -41_500, 37_000)


@dataclass(frozen=True)
class _ClassSpec:
    category: str  # nuScenes category name
    detection_name: str
    size_wlh: Tuple[float, float, float]  # devkit order: width, length, height
    colour: Tuple[int, int, int]  # RGB
    weight: float  # relative frequency
    moving_probability: float
    speed_range: Tuple[float, float]  # m/s when moving
    placement: str  # "lane", "bike", "walk", "roadside"


_CLASSES: Tuple[_ClassSpec, ...] = (
    _ClassSpec("vehicle.car", "car", (1.95, 4.62, 1.73), (40, 90, 230), 0.30, 0.5, (4.0, 12.0), "lane"),
    _ClassSpec("vehicle.truck", "truck", (2.52, 6.94, 2.84), (245, 140, 20), 0.07, 0.4, (4.0, 10.0), "lane"),
    _ClassSpec("vehicle.construction", "construction_vehicle", (2.85, 6.37, 3.19), (235, 220, 30), 0.03,
               0.2, (1.0, 4.0), "lane"),
    _ClassSpec("vehicle.bus.rigid", "bus", (2.94, 11.0, 3.47), (220, 30, 40), 0.04, 0.5, (4.0, 10.0), "lane"),
    _ClassSpec("vehicle.trailer", "trailer", (2.90, 12.29, 3.87), (130, 80, 40), 0.03, 0.3, (4.0, 9.0),
               "lane"),
    _ClassSpec("movable_object.barrier", "barrier", (2.53, 0.50, 0.98), (235, 235, 235), 0.09, 0.0, (0.0,
                                                                                                     0.0),
               "roadside"),
    _ClassSpec("vehicle.motorcycle", "motorcycle", (0.77, 2.11, 1.47), (220, 40, 220), 0.05, 0.5, (3.0, 9.0),
               "bike"),
    _ClassSpec("vehicle.bicycle", "bicycle", (0.60, 1.70, 1.28), (30, 220, 230), 0.06, 0.5, (2.0, 5.0),
               "bike"),
    _ClassSpec("human.pedestrian.adult", "pedestrian", (0.67, 0.73, 1.77), (40, 200, 60), 0.22, 0.6,
               (0.8, 1.6), "walk"),
    _ClassSpec("movable_object.trafficcone", "traffic_cone", (0.41, 0.41, 1.07), (255, 90, 0), 0.11, 0.0,
               (0.0, 0.0), "roadside"),
)
CLASS_COLOURS: Dict[str, Tuple[int, int, int]] = {spec.detection_name: spec.colour for spec in _CLASSES}

_ATTRIBUTES = (
    ("cycle.with_rider", "There is someone riding or pushing the bicycle or motorcycle."),
    ("cycle.without_rider", "There is nobody riding or pushing the bicycle or motorcycle."),
    ("pedestrian.moving", "The human is moving."),
    ("pedestrian.standing", "The human is standing."),
    ("pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.parked",
     "Vehicle is stationary (usually for longer duration) with no immediate intent to move."),
    ("vehicle.stopped",
     "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move."),
)
_VISIBILITY_LEVELS = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))
# nuscenes.utils.splits.mini_train / mini_val (copied: importing the devkit takes seconds; a test checks
# that they agree).
MINI_TRAIN_SCENES = (
    "scene-0061", "scene-0553", "scene-0655", "scene-0757",
    "scene-0796", "scene-1077", "scene-1094", "scene-1100",
)
MINI_VAL_SCENES = ("scene-0103", "scene-0916")
_LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")

# Box faces as corner indices of geometry.box_corners, with a shade factor (front = +x = brightest).
_FACES: Tuple[Tuple[Tuple[int, int, int, int], float], ...] = (
    ((0, 3, 7, 4), 1.00),  # front
    ((1, 2, 6, 5), 0.45),  # back
    ((0, 1, 5, 4), 0.72),  # left
    ((3, 2, 6, 7), 0.72),  # right
    ((4, 5, 6, 7), 0.88),  # top
    ((0, 1, 2, 3), 0.30),  # bottom
)


@dataclass(frozen=True)
class SyntheticDataset:
    """What :func:`make_synthetic` wrote."""

    root: Path
    version: str
    train_scenes: Tuple[str, ...]
    val_scenes: Tuple[str, ...]
    num_samples: int
    image_size: Tuple[int, int]  # (width, height)


@dataclass
class _Object:
    spec: _ClassSpec
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
class _EgoMotion:
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


class _TokenFactory:
    """Deterministic 32-hex-digit tokens, unique per (seed, table, key)."""

    def __init__(self, seed: int) -> None:
        self._seed = seed

    def __call__(self, table: str, *key: object) -> str:
        text = f"{self._seed}/{table}/" + "/".join(str(part) for part in key)
        return hashlib.md5(text.encode()).hexdigest()


def synthetic_version(num_scenes: int) -> str:
    """The nuScenes version whose official scene names a synthetic set of ``num_scenes`` scenes takes:
    v1.0-mini up to its 10 scenes, v1.0-trainval beyond."""
    return "v1.0-mini" if num_scenes <= len(MINI_TRAIN_SCENES) + len(MINI_VAL_SCENES) else "v1.0-trainval"


def _scene_names(version: str, num_scenes: int, extra_train_scenes: int = 0) -> Tuple[List[str], List[str]]:
    if version == "v1.0-mini":
        train_pool, val_pool = MINI_TRAIN_SCENES, MINI_VAL_SCENES
    elif version == "v1.0-trainval":
        from nuscenes.utils import splits  # importing the devkit takes seconds: only when needed

        train_pool, val_pool = splits.train, splits.val
    else:
        raise ValueError(f"synthetic nuScenes supports v1.0-mini and v1.0-trainval, not {version!r}")
    if num_scenes < 2:
        raise ValueError("num_scenes must be >= 2 (at least one training and one validation scene)")
    num_val = min(len(val_pool), max(1, round(num_scenes * 0.2)))
    num_train = num_scenes - num_val + extra_train_scenes
    if num_train > len(train_pool):
        raise ValueError(
            f"{version} has {len(train_pool) + len(val_pool)} official scene names; asked for "
            f"{num_scenes + extra_train_scenes} (use version='v1.0-trainval' for more scenes)"
        )
    return list(train_pool[:num_train]), list(val_pool[:num_val])


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
    rng: np.random.Generator, spec: _ClassSpec, ego: _EgoMotion, times: np.ndarray, near: bool
) -> _Object:
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
    return _Object(spec, anchor, anchor_time, speed * np.array([math.cos(yaw), math.sin(yaw)]), float(yaw))


def _spawn_objects(
    rng: np.random.Generator, ego: _EgoMotion, times: np.ndarray, count: int, uniform_classes: bool
) -> List[_Object]:
    """Place up to ``count`` objects around the ego path without overlaps at any key frame.

    Classes are drawn with nuScenes-like frequencies, or all equally often with ``uniform_classes``.
    """
    weights = np.array([1.0 if uniform_classes else spec.weight for spec in _CLASSES])
    weights /= weights.sum()
    ego_poses = [ego.pose(t) for t in times]
    ego_yaws = np.array([yaw for _, yaw in ego_poses])
    ego_centers = np.stack(
        [pos + EGO_FOOTPRINT_CENTER_X * np.array([math.cos(yaw), math.sin(yaw)]) for pos, yaw in ego_poses]
    )
    objects: List[_Object] = []
    for _ in range(count * 20):
        if len(objects) == count:
            break
        # Every class first, close to the ego path (so each scene evaluates every class), then at random.
        missing = [spec for spec in _CLASSES if all(obj.spec is not spec for obj in objects)]
        spec = missing[0] if missing else _CLASSES[rng.choice(len(_CLASSES), p=weights)]
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


def _attribute(spec: _ClassSpec, speed: float) -> str:
    """Attribute consistent with the class and its motion (the default rule of mmdet3d's result format)."""
    moving = speed > 0.2
    if spec.detection_name in ("car", "truck", "construction_vehicle", "trailer"):
        return "vehicle.moving" if moving else "vehicle.parked"
    if spec.detection_name == "bus":
        return "vehicle.moving" if moving else "vehicle.stopped"
    if spec.detection_name in ("bicycle", "motorcycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    if spec.detection_name == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    return ""


def _clip_near(points: np.ndarray) -> np.ndarray:
    """Clip a convex polygon (K, 3) in camera coordinates to z >= NEAR_PLANE_M (Sutherland-Hodgman)."""
    clipped = []
    for i in range(len(points)):
        current, following = points[i], points[(i + 1) % len(points)]
        current_in, following_in = current[2] >= NEAR_PLANE_M, following[2] >= NEAR_PLANE_M
        if current_in:
            clipped.append(current)
        if current_in != following_in:
            ratio = (NEAR_PLANE_M - current[2]) / (following[2] - current[2])
            clipped.append(current + ratio * (following - current))
    return np.array(clipped).reshape(-1, 3)


def _render_background(intrinsic: np.ndarray, cam2global: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sky gradient and a checkerboard ground plane (z = 0, 5 m squares, fogged with distance).

    Returns an (H, W, 3) uint8 image.
    """
    pixel_to_ray = (cam2global[:3, :3] @ np.linalg.inv(intrinsic)).astype(np.float32)
    u = np.arange(width, dtype=np.float32)[None, :] + 0.5
    v = np.arange(height, dtype=np.float32)[:, None] + 0.5
    # Global ray directions of the pixel centres, one (H, W) array per axis.
    ray_x, ray_y, ray_z = (
        pixel_to_ray[i, 0] * u + pixel_to_ray[i, 1] * v + pixel_to_ray[i, 2] for i in range(3)
    )
    origin = cam2global[:3, 3]
    sky_mix = np.clip(ray_z / np.sqrt(ray_x**2 + ray_y**2 + ray_z**2), 0.0, 0.5) * 2.0  # (H, W)
    ground = ray_z < -1e-6
    distance = -np.float32(origin[2]) / np.where(ground, ray_z, -1.0)
    hit_x, hit_y = origin[0] + distance * ray_x, origin[1] + distance * ray_y
    checker = (np.floor(hit_x / 5.0) + np.floor(hit_y / 5.0)) % 2
    fog = np.clip(distance / 150.0, 0.0, 1.0)
    channels = []
    # Per colour channel (broadcasting over a trailing axis of 3 is several times slower).
    for horizon, zenith, light, dark in ((185.0, 90.0, 128.0, 92.0), (205.0, 140.0, 126.0, 95.0),
                                        (225.0, 205.0, 120.0, 98.0)):
        sky = horizon + (zenith - horizon) * sky_mix
        floor = np.where(checker > 0, light, dark) * (1 - fog) + horizon * fog
        channels.append(np.where(ground, floor, sky))
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def _visible_faces(corners_cam: np.ndarray, intrinsic: np.ndarray) -> List[Tuple[np.ndarray, float]]:
    """Projected front-facing faces of one box, near-plane clipped: [(pixel polygon (K, 2), shade)]."""
    faces = []
    center = corners_cam.sum(axis=0) / 8.0
    for face, shade in _FACES:
        face_points = corners_cam[list(face)]
        face_center = face_points.sum(axis=0) / 4.0
        if np.dot(face_center - center, -face_center) <= 0:  # back face: normal points away from the camera
            continue
        polygon = _clip_near(face_points)
        if len(polygon) < 3:
            continue
        projected = polygon @ intrinsic.T
        faces.append((projected[:, :2] / projected[:, 2:3], shade))
    return faces


def _render_camera(
    intrinsic: np.ndarray, cam2global: np.ndarray, width: int, height: int,
    corners_global: np.ndarray, colours: Sequence[Tuple[int, int, int]],
) -> Tuple[Image.Image, np.ndarray, np.ndarray]:
    """Render one camera image; count each object's visible and silhouette pixels.

    ``corners_global`` (M, 8, 3) box corners, ``colours`` M RGB triples. Returns the RGB image,
    visible pixel counts (M,) (after occlusion) and silhouette areas (M,) (projected hull inside the
    image, as if unoccluded).
    """
    image = Image.fromarray(_render_background(intrinsic, cam2global, width, height))
    id_map = Image.new("I", (width, height), 0)
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(id_map)
    corners_cam = transform_points(invert_rigid(cam2global), corners_global)  # (M, 8, 3)
    silhouette = np.zeros(len(corners_cam))
    canvas = shapely.geometry.box(0, 0, width, height)
    for index in np.argsort(-np.linalg.norm(corners_cam.mean(axis=1), axis=1), kind="stable"):  # far to near
        if (corners_cam[index, :, 2] < NEAR_PLANE_M).all():
            continue
        faces = _visible_faces(corners_cam[index], intrinsic)
        if not faces:
            continue
        hull = shapely.geometry.MultiPoint(np.concatenate([polygon for polygon, _ in faces])).convex_hull
        silhouette[index] = hull.intersection(canvas).area
        for polygon, shade in faces:
            xy = [(float(x), float(y)) for x, y in polygon]
            colour = tuple(int(round(channel * shade)) for channel in colours[index])
            outline = tuple(int(round(channel * shade * 0.6)) for channel in colours[index])
            draw.polygon(xy, fill=colour, outline=outline)
            draw_ids.polygon(xy, fill=int(index) + 1)
    visible = np.bincount(np.asarray(id_map, dtype=np.int32).ravel(), minlength=len(corners_cam) + 1)[1:]
    return image, visible, silhouette


def _lidar_points(
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


def _count_points_in_boxes(
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


def _visibility_token(visible_pixels: float, silhouette_pixels: float) -> str:
    """nuScenes visibility bin ('1'..'4') of the visible fraction of an object's silhouettes."""
    fraction = min(1.0, visible_pixels / silhouette_pixels) if silhouette_pixels > 0 else 0.0
    for token, upper in (("1", 0.4), ("2", 0.6), ("3", 0.8)):
        if fraction < upper:
            return token
    return "4"


def _camera_calibration(
    spec: _CameraSpec, rng: np.random.Generator, width: int, height: int
) -> Tuple[np.ndarray, np.ndarray]:
    """(camera -> ego 4x4 with a small per-log tilt, intrinsic (3, 3) scaled to the image size)."""
    yaw = math.radians(spec.yaw_deg) + rng.normal(0.0, 0.003)
    pitch = rng.normal(0.0, 0.005)  # tilt of the optical axis, rad
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward], axis=1)  # columns: camera x, y, z in ego axes
    scale_x, scale_y = width / FULL_WIDTH, height / FULL_HEIGHT
    intrinsic = np.array(
        [[spec.focal * scale_x, 0.0, spec.principal[0] * scale_x],
         [0.0, spec.focal * scale_y, spec.principal[1] * scale_y],
         [0.0, 0.0, 1.0]]
    )
    return rigid_matrix(rotation, spec.translation), intrinsic


@dataclass(frozen=True)
class _Camera:
    channel: str
    calibration_token: str
    cam2ego: np.ndarray  # (4, 4)
    intrinsic: np.ndarray  # (3, 3)
    offset_us: int  # trigger time relative to the LiDAR


@dataclass(frozen=True)
class _SceneFrame:
    """The annotated objects of one key frame (gravity centres, (l, w, h) sizes, yaws)."""

    object_indices: List[int]
    centers: np.ndarray  # (M, 3)
    sizes_lwh: np.ndarray  # (M, 3)
    yaws: np.ndarray  # (M,)


class _DatasetWriter:
    """Accumulates the nuScenes tables and writes sensor files under ``root``."""

    def __init__(self, root: Path, seed: int, image_size: Tuple[int, int], jpeg_quality: int) -> None:
        self.root = root
        self.token = _TokenFactory(seed)
        self.rng = np.random.default_rng(seed)
        self.width, self.height = image_size
        self.jpeg_quality = jpeg_quality
        self.tables: Dict[str, List[dict]] = {
            name: []
            for name in ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map",
                         "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")
        }
        self.map_logs: Dict[str, List[str]] = {location: [] for location in _LOCATIONS}
        self._write_static_tables()

    def _write_static_tables(self) -> None:
        token = self.token
        self.tables["attribute"] = [
            {"token": token("attribute", name), "name": name, "description": description}
            for name, description in _ATTRIBUTES
        ]
        self.tables["category"] = [
            {"token": token("category", spec.category), "name": spec.category,
             "description": spec.detection_name, "index": index}
            for index, spec in enumerate(_CLASSES)
        ]
        self.tables["visibility"] = [
            {"token": level_token, "level": level, "description": f"visibility of whole object is in {level}"}
            for level_token, level in _VISIBILITY_LEVELS
        ]
        channels = [camera.channel for camera in _CAMERAS] + ["LIDAR_TOP"]
        self.tables["sensor"] = [
            {"token": token("sensor", channel), "channel": channel,
             "modality": "lidar" if channel == "LIDAR_TOP" else "camera"}
            for channel in channels
        ]
        (self.root / "maps").mkdir(parents=True, exist_ok=True)
        for channel in channels:
            (self.root / "samples" / channel).mkdir(parents=True, exist_ok=True)

    def _add_ego_pose(self, key: Tuple[object, ...], timestamp: int, ego2global: np.ndarray) -> str:
        pose_token = self.token("ego_pose", *key)
        self.tables["ego_pose"].append(
            {"token": pose_token, "timestamp": timestamp,
             "rotation": matrix_to_quaternion(ego2global[:3, :3]).tolist(),
             "translation": ego2global[:3, 3].tolist()}
        )
        return pose_token

    def _add_sample_data(self, scene: str, k: int, num_frames: int, channel: str, **fields: object) -> None:
        token = self.token
        self.tables["sample_data"].append(
            {"token": token("sample_data", scene, k, channel), "sample_token": token("sample", scene, k),
             "is_key_frame": True,
             "prev": token("sample_data", scene, k - 1, channel) if k > 0 else "",
             "next": token("sample_data", scene, k + 1, channel) if k + 1 < num_frames else "",
             **fields}
        )

    def write_log(self, scene: str, location: str) -> Tuple[str, np.ndarray, List[_Camera]]:
        """Log and per-log calibration of one scene: (log token, LiDAR -> ego, cameras)."""
        token = self.token
        log_token = token("log", scene)
        self.map_logs[location].append(log_token)
        self.tables["log"].append(
            {"token": log_token, "logfile": f"synthetic-{scene}", "vehicle": "n015",
             "date_captured": "2018-08-01", "location": location}
        )
        lidar_rotation = yaw_to_quaternion(-math.pi / 2)  # nuScenes LIDAR_TOP: x to the right of the car
        lidar_translation = [0.943, 0.0, LIDAR_HEIGHT_M]
        self.tables["calibrated_sensor"].append(
            {"token": token("calibrated_sensor", scene, "LIDAR_TOP"),
             "sensor_token": token("sensor", "LIDAR_TOP"),
             "translation": lidar_translation, "rotation": lidar_rotation.tolist(), "camera_intrinsic": []}
        )
        cameras = []
        for spec, offset_us in zip(_CAMERAS, _CAMERA_OFFSETS_US):
            cam2ego, intrinsic = _camera_calibration(spec, self.rng, self.width, self.height)
            calibration_token = token("calibrated_sensor", scene, spec.channel)
            self.tables["calibrated_sensor"].append(
                {"token": calibration_token, "sensor_token": token("sensor", spec.channel),
                 "translation": cam2ego[:3, 3].tolist(),
                 "rotation": matrix_to_quaternion(cam2ego[:3, :3]).tolist(),
                 "camera_intrinsic": intrinsic.tolist()}
            )
            cameras.append(_Camera(spec.channel, calibration_token, cam2ego, intrinsic, offset_us))
        return log_token, pose_matrix(lidar_rotation, lidar_translation), cameras

    def write_scene(
        self, scene: str, location: str, start_us: int, num_frames: int, objects_per_scene: int,
        annotation_range: float, uniform_classes: bool,
    ) -> None:
        """One scene: ego motion, objects, and every key frame's sensor data and annotations."""
        rng, token = self.rng, self.token
        log_token, lidar2ego, cameras = self.write_log(scene, location)
        parked = rng.uniform() < 0.15
        scene_index = len(self.tables["scene"])
        ego = _EgoMotion(
            origin=np.array([300.0 + 600.0 * scene_index, 900.0 + 40.0 * scene_index]),
            heading=float(rng.uniform(-math.pi, math.pi)),
            speed=0.0 if parked else float(rng.uniform(3.0, 9.0)),
            yaw_rate=0.0 if parked else float(rng.uniform(-0.06, 0.06)),
        )
        jitter_us = rng.integers(-3000, 3000, size=num_frames)
        jitter_us[0] = 0
        sample_us = [start_us + k * KEYFRAME_INTERVAL_US + int(jitter) for k, jitter in enumerate(jitter_us)]
        times = (np.array(sample_us) - start_us) / 1e6
        objects = _spawn_objects(rng, ego, times, objects_per_scene, uniform_classes)
        # Each object is annotated over one contiguous span of key frames (near the ego).
        ego_positions = np.stack([ego.pose(t)[0] for t in times])
        spans: List[Optional[Tuple[int, int]]] = []
        for obj in objects:
            distances = np.linalg.norm(obj.positions(times) - ego_positions, axis=1)
            near = np.flatnonzero(distances < annotation_range)
            spans.append((int(near[0]), int(near[-1])) if len(near) else None)

        for k, timestamp in enumerate(sample_us):
            indices = [i for i, span in enumerate(spans) if span is not None and span[0] <= k <= span[1]]
            frame = _SceneFrame(
                object_indices=indices,
                centers=np.array([[*objects[i].positions(times[k:k + 1])[0], objects[i].spec.size_wlh[2] / 2]
                                  for i in indices]).reshape(-1, 3),
                sizes_lwh=np.array([objects[i].size_lwh for i in indices]).reshape(-1, 3),
                yaws=np.array([objects[i].yaw for i in indices]),
            )
            self.tables["sample"].append(
                {"token": token("sample", scene, k), "timestamp": timestamp,
                 "prev": token("sample", scene, k - 1) if k > 0 else "",
                 "next": token("sample", scene, k + 1) if k + 1 < num_frames else "",
                 "scene_token": token("scene", scene)}
            )
            self._write_key_frame(scene, k, num_frames, timestamp, start_us, ego, lidar2ego, cameras, frame,
                                  objects, spans)

        for i, (obj, span) in enumerate(zip(objects, spans)):
            if span is None:
                continue
            self.tables["instance"].append(
                {"token": token("instance", scene, i), "category_token": token("category", obj.spec.category),
                 "nbr_annotations": span[1] - span[0] + 1,
                 "first_annotation_token": token("sample_annotation", scene, i, span[0]),
                 "last_annotation_token": token("sample_annotation", scene, i, span[1])}
            )
        self.tables["scene"].append(
            {"token": token("scene", scene), "log_token": log_token, "nbr_samples": num_frames,
             "first_sample_token": token("sample", scene, 0),
             "last_sample_token": token("sample", scene, num_frames - 1), "name": scene,
             "description": f"synthetic scene, {len(objects)} objects" + (", ego parked" if parked else "")}
        )

    def _write_key_frame(
        self, scene: str, k: int, num_frames: int, timestamp: int, start_us: int, ego: _EgoMotion,
        lidar2ego: np.ndarray, cameras: List[_Camera], frame: _SceneFrame, objects: List[_Object],
        spans: List[Optional[Tuple[int, int]]],
    ) -> None:
        token = self.token
        corners = box_corners(frame.centers, frame.sizes_lwh, frame.yaws)  # (M, 8, 3) global
        colours = [objects[i].spec.colour for i in frame.object_indices]

        # LiDAR: points on the ground and on every annotated object.
        ego2global = ego.matrix((timestamp - start_us) / 1e6)
        lidar2global = ego2global @ lidar2ego
        points = _lidar_points(self.rng, lidar2global, frame.centers, frame.sizes_lwh, frame.yaws)
        lidar_file = f"samples/LIDAR_TOP/{scene}__LIDAR_TOP__{timestamp}.pcd.bin"
        points.tofile(self.root / lidar_file)
        points_global = transform_points(lidar2global, points[:, :3].astype(np.float64))
        num_lidar_pts = _count_points_in_boxes(points_global, frame.centers, frame.sizes_lwh, frame.yaws)
        self._add_sample_data(
            scene, k, num_frames, "LIDAR_TOP",
            ego_pose_token=self._add_ego_pose((scene, k, "LIDAR_TOP"), timestamp, ego2global),
            calibrated_sensor_token=token("calibrated_sensor", scene, "LIDAR_TOP"), timestamp=timestamp,
            fileformat="pcd", height=0, width=0, filename=lidar_file,
        )

        # Cameras: each at its own time and ego pose; objects at the key-frame time (as annotated).
        visible = np.zeros(len(corners))
        silhouette = np.zeros(len(corners))
        for camera in cameras:
            camera_us = timestamp + camera.offset_us
            camera_ego2global = ego.matrix((camera_us - start_us) / 1e6)
            image, visible_pixels, silhouette_pixels = _render_camera(
                camera.intrinsic, camera_ego2global @ camera.cam2ego, self.width, self.height, corners,
                colours,
            )
            visible += visible_pixels
            silhouette += silhouette_pixels
            image_file = f"samples/{camera.channel}/{scene}__{camera.channel}__{camera_us}.jpg"
            image.save(self.root / image_file, quality=self.jpeg_quality)
            self._add_sample_data(
                scene, k, num_frames, camera.channel,
                ego_pose_token=self._add_ego_pose((scene, k, camera.channel), camera_us, camera_ego2global),
                calibrated_sensor_token=camera.calibration_token, timestamp=camera_us, fileformat="jpg",
                height=self.height, width=self.width, filename=image_file,
            )

        attribute_tokens = {row["name"]: row["token"] for row in self.tables["attribute"]}
        for row, i in enumerate(frame.object_indices):
            obj, (first, last) = objects[i], spans[i]
            attribute = _attribute(obj.spec, float(np.linalg.norm(obj.velocity)))
            self.tables["sample_annotation"].append(
                {"token": token("sample_annotation", scene, i, k), "sample_token": token("sample", scene, k),
                 "instance_token": token("instance", scene, i),
                 "visibility_token": _visibility_token(visible[row], silhouette[row]),
                 "attribute_tokens": [attribute_tokens[attribute]] if attribute else [],
                 "translation": frame.centers[row].tolist(), "size": list(obj.spec.size_wlh),
                 "rotation": yaw_to_quaternion(obj.yaw).tolist(),
                 "prev": token("sample_annotation", scene, i, k - 1) if k > first else "",
                 "next": token("sample_annotation", scene, i, k + 1) if k < last else "",
                 "num_lidar_pts": int(num_lidar_pts[row]), "num_radar_pts": 0}
            )

    def save(self, version: str) -> None:
        """Write the map masks and every table as ``<root>/<version>/<table>.json``."""
        for location, log_tokens in self.map_logs.items():
            if not log_tokens:
                continue
            map_file = f"maps/{self.token('map', location)}.png"
            Image.new("L", (8, 8), 255).save(self.root / map_file)
            self.tables["map"].append(
                {"token": self.token("map", location), "log_tokens": log_tokens, "category": "semantic_prior",
                 "filename": map_file}
            )
        table_dir = self.root / version
        table_dir.mkdir(parents=True, exist_ok=True)
        for table_name, rows in self.tables.items():
            with open(table_dir / f"{table_name}.json", "w") as handle:
                json.dump(rows, handle, indent=0)


def make_synthetic(
    out_dir: str | Path,
    *,
    num_scenes: int = 10,
    samples_per_scene: int = 10,
    objects_per_scene: int = 36,
    image_size: Tuple[int, int] = (400, 225),
    version: str = "v1.0-mini",
    annotation_range: float = 55.0,
    uniform_classes: bool = False,
    extra_train_scenes: int = 0,
    jpeg_quality: int = 85,
    seed: int = 0,
) -> SyntheticDataset:
    """Write a synthetic nuScenes dataset to ``out_dir`` and describe it.

    ``image_size`` is (width, height); intrinsics are the nuScenes ones scaled by
    ``width / 1600`` and ``height / 900``. Objects are annotated at the key frames where their BEV
    distance to the ego is below ``annotation_range`` (one contiguous span per object). Classes follow
    nuScenes-like frequencies (cars most, trailers fewest), or are equally frequent with ``uniform_classes``.
    ``num_scenes`` are split 80 / 20 into training and validation scenes; ``extra_train_scenes`` more
    training scenes are generated after them, so the ``num_scenes`` scenes (validation ones included)
    are the same with or without them.
    Default size: 10 scenes x 10 samples, about 10 MB.
    """
    if samples_per_scene < 2:
        raise ValueError("samples_per_scene must be >= 2")
    train_names, val_names = _scene_names(version, num_scenes, extra_train_scenes)
    writer = _DatasetWriter(Path(out_dir), seed, image_size, jpeg_quality)
    first_train = len(train_names) - extra_train_scenes
    scene_names = train_names[:first_train] + val_names + train_names[first_train:]
    # Recording order, independent of the split; the extra scenes were recorded last.
    time_order = np.concatenate([writer.rng.permutation(num_scenes), np.arange(num_scenes, len(scene_names))])
    for scene_index, name in enumerate(scene_names):
        writer.write_scene(
            name, _LOCATIONS[scene_index % len(_LOCATIONS)],
            start_us=FIRST_TIMESTAMP_US + int(time_order[scene_index]) * 120_000_000,
            num_frames=samples_per_scene, objects_per_scene=objects_per_scene,
            annotation_range=annotation_range, uniform_classes=uniform_classes,
        )
    writer.save(version)
    return SyntheticDataset(
        root=Path(out_dir), version=version, train_scenes=tuple(train_names), val_scenes=tuple(val_names),
        num_samples=len(writer.tables["sample"]), image_size=tuple(image_size),
    )
