"""The camera rig: nuScenes-like extrinsics, intrinsics scaled to the image size, trigger offsets."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ..geometry import rigid_matrix

FULL_WIDTH, FULL_HEIGHT = 1600, 900


@dataclass(frozen=True)
class CameraSpec:
    """One camera of the rig, at the full 1600 x 900 nuScenes resolution."""

    channel: str
    yaw_deg: float  # optical axis heading in the ego frame
    translation: Tuple[float, float, float]  # camera -> ego, m
    focal: float  # pixels at 1600 x 900
    principal: Tuple[float, float]  # (cx, cy) at 1600 x 900


# Close to the nuScenes calibration of scene-0061 (values rounded).
CAMERAS: Tuple[CameraSpec, ...] = (
    CameraSpec("CAM_FRONT", 0.0, (1.70, 0.016, 1.51), 1266.4, (816.3, 491.5)),
    CameraSpec("CAM_FRONT_RIGHT", -55.0, (1.55, -0.49, 1.50), 1260.8, (808.0, 495.3)),
    CameraSpec("CAM_FRONT_LEFT", 55.0, (1.52, 0.49, 1.51), 1272.6, (826.6, 479.8)),
    CameraSpec("CAM_BACK", 180.0, (0.03, 0.003, 1.58), 809.2, (829.2, 481.8)),
    CameraSpec("CAM_BACK_LEFT", 110.0, (1.04, 0.48, 1.56), 1256.7, (817.8, 452.0)),
    CameraSpec("CAM_BACK_RIGHT", -110.0, (1.03, -0.48, 1.57), 1259.5, (807.3, 501.2)),
)
# Camera trigger offsets from the LiDAR time, microseconds (nuScenes cameras fire as the LiDAR sweeps by).
CAMERA_OFFSETS_US = (12_000, 20_500, 4_000, 45_000, -41_500, 37_000)


def camera_calibration(
    spec: CameraSpec, rng: np.random.Generator, width: int, height: int
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
class Camera:
    """One calibrated camera of a log (intrinsics at the generated image size)."""

    channel: str
    calibration_token: str
    cam2ego: np.ndarray  # (4, 4)
    intrinsic: np.ndarray  # (3, 3)
    offset_us: int  # trigger time relative to the LiDAR
