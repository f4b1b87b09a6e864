"""The typed info records: one key frame (:class:`SampleInfo`), its cameras (:class:`CameraInfo`) and
the samples of a split (:class:`InfoSet`), as the reference converter's ``nuscenes2d_temporal_infos_*.pkl``
describes them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

CAMERA_NAMES: Tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)
# Class order of the reference converter's 2D labels (nuscenes_converter.py nus_categories).
CONVERTER_CLASSES: Tuple[str, ...] = (
    "car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle", "pedestrian",
    "traffic_cone", "barrier",
)


@dataclass
class CameraInfo:
    """One camera of one sample."""

    data_path: str  # image path, relative to the dataset root (or as stored in a reference .pkl)
    timestamp: int  # microseconds
    sample_data_token: str
    sensor2lidar_rotation: np.ndarray  # (3, 3) f64, p_lidar = R p_cam + t, at the sample's LiDAR time
    sensor2lidar_translation: np.ndarray  # (3,) f64
    intrinsic: np.ndarray  # (3, 3) f64, pixels of the stored image


@dataclass
class SampleInfo:
    """One key frame: poses, cameras and annotations (empty arrays for test splits)."""

    token: str
    scene_token: str
    prev: str
    next: str
    frame_idx: int
    timestamp: int  # microseconds
    num_sweeps: int  # earlier LiDAR sweeps, capped at 10; 0 at the first frame of a scene
    lidar_path: str
    lidar2ego_translation: np.ndarray  # (3,)
    lidar2ego_rotation: np.ndarray  # (4,) quaternion (w, x, y, z)
    ego2global_translation: np.ndarray  # (3,)
    ego2global_rotation: np.ndarray  # (4,)
    cams: Dict[str, CameraInfo]  # in CAMERA_NAMES order
    gt_boxes: np.ndarray  # (M, 7) LiDAR frame: gravity centre xyz, (l, w, h), yaw
    gt_names: np.ndarray  # (M,) str, mapped class names (unmapped categories keep their raw name)
    gt_velocity: np.ndarray  # (M, 2) LiDAR frame m/s, NaN when unknown
    num_lidar_pts: np.ndarray  # (M,) int64
    num_radar_pts: np.ndarray  # (M,) int64
    valid_flag: np.ndarray  # (M,) bool, num_lidar_pts + num_radar_pts > 0
    bboxes2d: List[np.ndarray]  # per camera (k, 4) f32 x1, y1, x2, y2
    labels2d: List[np.ndarray]  # per camera (k,) i64 in CONVERTER_CLASSES order
    centers2d: List[np.ndarray]  # per camera (k, 2) f32 projected 3D centre, pixels
    depths: List[np.ndarray]  # per camera (k,) f32 camera-frame depth of the centre, m


@dataclass
class InfoSet:
    """The samples of one split and the nuScenes version they come from."""

    version: str
    samples: List[SampleInfo]
