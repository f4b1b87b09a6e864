"""The nuScenes table writer: every table of a scene's key frames, with its sensor files."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..geometry import box_corners, matrix_to_quaternion, pose_matrix, transform_points, yaw_to_quaternion
from .cameras import CAMERA_OFFSETS_US, CAMERAS, Camera, camera_calibration
from .lidar import LIDAR_HEIGHT_M, count_points_in_boxes, lidar_points
from .render import render_camera
from .world import CLASSES, ClassSpec, EgoMotion, SceneObject, spawn_objects

KEYFRAME_INTERVAL_US = 500_000

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
LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")


class _TokenFactory:
    """Deterministic 32-hex-digit tokens, unique per (seed, table, key)."""

    def __init__(self, seed: int) -> None:
        self._seed = seed

    def __call__(self, table: str, *key: object) -> str:
        text = f"{self._seed}/{table}/" + "/".join(str(part) for part in key)
        return hashlib.md5(text.encode()).hexdigest()


def _attribute(spec: ClassSpec, speed: float) -> str:
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


def _visibility_token(visible_pixels: float, silhouette_pixels: float) -> str:
    """nuScenes visibility bin ('1'..'4') of the visible fraction of an object's silhouettes."""
    fraction = min(1.0, visible_pixels / silhouette_pixels) if silhouette_pixels > 0 else 0.0
    for token, upper in (("1", 0.4), ("2", 0.6), ("3", 0.8)):
        if fraction < upper:
            return token
    return "4"


@dataclass(frozen=True)
class _SceneFrame:
    """The annotated objects of one key frame (gravity centres, (l, w, h) sizes, yaws)."""

    object_indices: List[int]
    centers: np.ndarray  # (M, 3)
    sizes_lwh: np.ndarray  # (M, 3)
    yaws: np.ndarray  # (M,)


class DatasetWriter:
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
        self.map_logs: Dict[str, List[str]] = {location: [] for location in LOCATIONS}
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
            for index, spec in enumerate(CLASSES)
        ]
        self.tables["visibility"] = [
            {"token": level_token, "level": level, "description": f"visibility of whole object is in {level}"}
            for level_token, level in _VISIBILITY_LEVELS
        ]
        channels = [camera.channel for camera in CAMERAS] + ["LIDAR_TOP"]
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

    def write_log(self, scene: str, location: str) -> Tuple[str, np.ndarray, List[Camera]]:
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
        for spec, offset_us in zip(CAMERAS, CAMERA_OFFSETS_US):
            cam2ego, intrinsic = camera_calibration(spec, self.rng, self.width, self.height)
            calibration_token = token("calibrated_sensor", scene, spec.channel)
            self.tables["calibrated_sensor"].append(
                {"token": calibration_token, "sensor_token": token("sensor", spec.channel),
                 "translation": cam2ego[:3, 3].tolist(),
                 "rotation": matrix_to_quaternion(cam2ego[:3, :3]).tolist(),
                 "camera_intrinsic": intrinsic.tolist()}
            )
            cameras.append(Camera(spec.channel, calibration_token, cam2ego, intrinsic, offset_us))
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
        ego = EgoMotion(
            origin=np.array([300.0 + 600.0 * scene_index, 900.0 + 40.0 * scene_index]),
            heading=float(rng.uniform(-math.pi, math.pi)),
            speed=0.0 if parked else float(rng.uniform(3.0, 9.0)),
            yaw_rate=0.0 if parked else float(rng.uniform(-0.06, 0.06)),
        )
        jitter_us = rng.integers(-3000, 3000, size=num_frames)
        jitter_us[0] = 0
        sample_us = [start_us + k * KEYFRAME_INTERVAL_US + int(jitter) for k, jitter in enumerate(jitter_us)]
        times = (np.array(sample_us) - start_us) / 1e6
        objects = spawn_objects(rng, ego, times, objects_per_scene, uniform_classes)
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
        self, scene: str, k: int, num_frames: int, timestamp: int, start_us: int, ego: EgoMotion,
        lidar2ego: np.ndarray, cameras: List[Camera], frame: _SceneFrame, objects: List[SceneObject],
        spans: List[Optional[Tuple[int, int]]],
    ) -> None:
        token = self.token
        corners = box_corners(frame.centers, frame.sizes_lwh, frame.yaws)  # (M, 8, 3) global
        colours = [objects[i].spec.colour for i in frame.object_indices]

        # LiDAR: points on the ground and on every annotated object.
        ego2global = ego.matrix((timestamp - start_us) / 1e6)
        lidar2global = ego2global @ lidar2ego
        points = lidar_points(self.rng, lidar2global, frame.centers, frame.sizes_lwh, frame.yaws)
        lidar_file = f"samples/LIDAR_TOP/{scene}__LIDAR_TOP__{timestamp}.pcd.bin"
        points.tofile(self.root / lidar_file)
        points_global = transform_points(lidar2global, points[:, :3].astype(np.float64))
        num_lidar_pts = count_points_in_boxes(points_global, frame.centers, frame.sizes_lwh, frame.yaws)
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
            image, visible_pixels, silhouette_pixels = render_camera(
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
