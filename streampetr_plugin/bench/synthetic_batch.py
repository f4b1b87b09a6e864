"""Synthetic batches of a recipe's real shapes, in the batch contract of :mod:`streampetr_plugin.data.batch`.

A benchmark must not need a dataset, but it must run the model on what training feeds it: B streams
(``data.batch_size_per_device``), six cameras with nuScenes-like geometry, the dataset's ``final_dim``
padded to its ``size_divisor``, and a realistic number of ground-truth boxes inside the point-cloud
range with their 2D boxes, projected centres and depths (the denoising queries and both matchers
scale with the number of boxes, so an empty frame would time a cheaper model).

The rig: camera ``c`` looks along ``CAMERA_YAWS_DEG[c]`` (the nuScenes info order), with the focal
length and principal point of a 1600 x 900 nuScenes camera resized and bottom-cropped to the input
as the test-time pipeline does. Boxes are fixed in each stream's LiDAR frame; the ego moves forward
``EGO_SPEED_M_S`` per second and one frame is ``FRAME_INTERVAL_S`` long, so the streaming memory sees
real ego motion and time steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.data.batch import TARGET_KEYS
from streampetr_plugin.training.batches import move_to_device

NUM_CAMERAS = 6
CAMERA_YAWS_DEG: Tuple[float, ...] = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)  # FRONT, FRONT_RIGHT, ... order
NUSCENES_IMAGE_HW: Tuple[int, int] = (900, 1600)
NUSCENES_FOCAL_PX = 1260.0  # at 1600 x 900
CAMERA_OFFSET_M = 0.8  # camera centre ahead of the LiDAR along its optical axis
CAMERA_DROP_M = 0.3  # cameras sit this much below the LiDAR
FRAME_INTERVAL_S = 0.5  # nuScenes key frames are 2 Hz
EGO_SPEED_M_S = 5.0
FIRST_TIMESTAMP_S = 1.5331516e9  # absolute seconds, as nuScenes (needs float64)
DEFAULT_BOXES_PER_FRAME = 32  # about the mean number of annotated objects in range per nuScenes key frame
MIN_DEPTH_M = 0.5


@dataclass(frozen=True)
class StreamShape:
    """What a synthetic batch must look like for one recipe (training or inference side)."""

    batch_size: int
    image_hw: Tuple[int, int]  # padded network input (H, W)
    pc_range: Tuple[float, ...]  # (x_min, y_min, z_min, x_max, y_max, z_max), m
    num_classes: int


def _padded(size: int, divisor: int) -> int:
    return int(math.ceil(size / divisor) * divisor)


def stream_shape(recipe: Recipe, *, training: bool = True) -> StreamShape:
    """The batch shape of ``recipe``: batch size per device, padded ``final_dim``, the head's ``pc_range``."""
    data = recipe.data
    dataset_options = (data.train if training else data.val).options()
    height, width = dataset_options.get("final_dim", (320, 800))
    divisor = int(dataset_options.get("size_divisor", 32))
    pc_range = recipe.model.head.options().get("pc_range") or dataset_options.get("point_cloud_range")
    return StreamShape(
        batch_size=data.batch_size_per_device if training else data.val_batch_size_per_device,
        image_hw=(_padded(int(height), divisor), _padded(int(width), divisor)),
        pc_range=tuple(float(v) for v in pc_range),
        num_classes=len(data.class_names),
    )


def camera_intrinsics(image_hw: Tuple[int, int]) -> torch.Tensor:
    """(4, 4) viewpad of a nuScenes camera resized by ``max(H / 900, W / 1600)`` and cropped to ``image_hw``
    (bottom rows and centre columns kept, as the test-time pipeline)."""
    height, width = image_hw
    full_h, full_w = NUSCENES_IMAGE_HW
    scale = max(height / full_h, width / full_w)
    crop_top = full_h * scale - height
    crop_left = (full_w * scale - width) / 2.0
    viewpad = torch.eye(4)
    viewpad[0, 0] = viewpad[1, 1] = NUSCENES_FOCAL_PX * scale
    viewpad[0, 2] = full_w / 2.0 * scale - crop_left
    viewpad[1, 2] = full_h / 2.0 * scale - crop_top
    return viewpad


def lidar_to_camera(yaw_deg: float) -> torch.Tensor:
    """(4, 4) LiDAR -> camera (OpenCV axes: x right, y down, z along the optical axis) of a camera looking
    along ``yaw_deg`` in the LiDAR's horizontal plane (x forward, y left, z up)."""
    yaw = math.radians(yaw_deg)
    forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
    right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])
    down = torch.tensor([0.0, 0.0, -1.0])
    rotation = torch.stack([right, down, forward])  # rows: camera axes in LiDAR coordinates
    centre = CAMERA_OFFSET_M * forward + torch.tensor([0.0, 0.0, -CAMERA_DROP_M])
    extrinsic = torch.eye(4)
    extrinsic[:3, :3] = rotation
    extrinsic[:3, 3] = -rotation @ centre
    return extrinsic


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Corners (n, 8, 3) of boxes (n, >=7) given as (x, y, z_gravity, x_size, y_size, z_size, yaw, ...)."""
    signs = torch.tensor(
        [[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)], dtype=boxes.dtype
    )  # (8, 3)
    local = signs[None] * boxes[:, None, 3:6]  # (n, 8, 3)
    cos, sin = torch.cos(boxes[:, 6])[:, None], torch.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin
    y = local[..., 0] * sin + local[..., 1] * cos
    return torch.stack([x, y, local[..., 2]], dim=-1) + boxes[:, None, :3]


def project(points: torch.Tensor, lidar2img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixels (..., 2) and depths (...) of LiDAR points (..., 3) under a (4, 4) ``lidar2img``."""
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    camera = homogeneous @ lidar2img.T  # (..., 4): (u d, v d, d, 1)
    depth = camera[..., 2]
    pixels = camera[..., :2] / depth.clamp(min=1e-6)[..., None]
    return pixels, depth


def random_boxes(
    count: int, pc_range: Sequence[float], generator: torch.Generator
) -> torch.Tensor:
    """(count, 9) boxes (x, y, z_gravity, x_size, y_size, z_size, yaw, vx, vy) with centres well inside
    ``pc_range`` and nuScenes-like sizes (0.5-5 m long, 0.5-2.5 m wide, 1-3 m tall)."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    x_min, y_min, z_min, x_max, y_max, z_max = pc_range
    reach = 0.9 * min(x_max, y_max, -x_min, -y_min)
    radius = uniform(3.0, reach)
    angle = uniform(-math.pi, math.pi)
    z_low = max(z_min + 1.0, -2.5)
    z_high = max(z_low, min(z_max - 1.0, 0.5))
    return torch.stack(
        [
            radius * torch.cos(angle),
            radius * torch.sin(angle),
            uniform(z_low, z_high),
            uniform(0.5, 5.0),
            uniform(0.5, 2.5),
            uniform(1.0, 3.0),
            uniform(-math.pi, math.pi),
            2.0 * torch.randn(count, generator=generator),
            2.0 * torch.randn(count, generator=generator),
        ],
        dim=1,
    )


def image_targets(
    boxes: torch.Tensor, labels: torch.Tensor, lidar2img: torch.Tensor, image_hw: Tuple[int, int]
) -> Dict[str, torch.Tensor]:
    """2D targets of one camera: boxes in front of it whose centre projects inside the image.

    Returns ``gt_bboxes_2d`` (m, 4) xyxy clipped to the image, ``gt_labels_2d`` (m,), ``centers_2d`` (m, 2),
    ``depths`` (m,).
    """
    height, width = image_hw
    corner_px, corner_depth = project(box_corners(boxes), lidar2img)  # (n, 8, 2), (n, 8)
    centre_px, centre_depth = project(boxes[:, :3], lidar2img)  # (n, 2), (n,)
    inside = (
        (corner_depth > MIN_DEPTH_M).all(dim=1)
        & (centre_px[:, 0] >= 0) & (centre_px[:, 0] < width)
        & (centre_px[:, 1] >= 0) & (centre_px[:, 1] < height)
    )
    corner_px = corner_px[inside]
    x1 = corner_px[..., 0].amin(dim=1).clamp(0, width - 1)
    y1 = corner_px[..., 1].amin(dim=1).clamp(0, height - 1)
    x2 = corner_px[..., 0].amax(dim=1).clamp(0, width - 1)
    y2 = corner_px[..., 1].amax(dim=1).clamp(0, height - 1)
    return {
        "gt_bboxes_2d": torch.stack([x1, y1, x2, y2], dim=1),
        "gt_labels_2d": labels[inside],
        "centers_2d": centre_px[inside],
        "depths": centre_depth[inside],
    }


class SyntheticStreams:
    """B synthetic streams of one shape; :meth:`frame` gives frame ``index`` of every stream as a batch.

    Images, cameras and targets are drawn once (seeded) and reused by every frame; each frame has its
    own timestamp and ego pose, and ``prev_exists`` is 0 only at frame 0. Row ``b`` keeps its scene
    token, so the detector's inference rule also continues the streams.

    Args:
        shape: batch size, padded image size, point-cloud range and number of classes.
        boxes_per_frame: ground-truth boxes per frame (targets are built only with ``with_targets``).
        with_targets: add the training targets of the batch contract.
        seed: everything drawn is a function of it.
    """

    def __init__(
        self,
        shape: StreamShape,
        *,
        boxes_per_frame: int = DEFAULT_BOXES_PER_FRAME,
        with_targets: bool = True,
        seed: int = 0,
    ) -> None:
        self.shape = shape
        self.with_targets = with_targets
        generator = torch.Generator().manual_seed(seed)
        batch, (height, width) = shape.batch_size, shape.image_hw
        intrinsics = camera_intrinsics(shape.image_hw).expand(NUM_CAMERAS, 4, 4)
        extrinsics = torch.stack([lidar_to_camera(yaw) for yaw in CAMERA_YAWS_DEG])  # (N, 4, 4)
        lidar2img = intrinsics @ extrinsics
        self._static: Dict[str, Any] = {
            "img": torch.randn(batch, NUM_CAMERAS, 3, height, width, generator=generator),
            "intrinsics": intrinsics.expand(batch, -1, -1, -1).contiguous(),
            "extrinsics": extrinsics.expand(batch, -1, -1, -1).contiguous(),
            "lidar2img": lidar2img.expand(batch, -1, -1, -1).contiguous(),
        }
        if with_targets:
            self._static.update(self._targets(boxes_per_frame, lidar2img, generator))
        self._device_copies: Dict[torch.device, Dict[str, Any]] = {}

    def _targets(
        self, boxes_per_frame: int, lidar2img: torch.Tensor, generator: torch.Generator
    ) -> Dict[str, List[Any]]:
        shape = self.shape
        targets: Dict[str, List[Any]] = {key: [] for key in TARGET_KEYS}
        for _ in range(shape.batch_size):
            boxes = random_boxes(boxes_per_frame, shape.pc_range, generator)
            labels = torch.randint(0, shape.num_classes, (boxes_per_frame,), generator=generator)
            targets["gt_bboxes_3d"].append(boxes)
            targets["gt_labels_3d"].append(labels)
            per_camera = [image_targets(boxes, labels, matrix, shape.image_hw) for matrix in lidar2img]
            for key in ("gt_bboxes_2d", "gt_labels_2d", "centers_2d", "depths"):
                targets[key].append([camera[key] for camera in per_camera])
        return targets

    def _on_device(self, device: torch.device) -> Dict[str, Any]:
        if device not in self._device_copies:
            self._device_copies[device] = move_to_device(self._static, device)
        return self._device_copies[device]

    def frame(self, index: int, device: Optional[torch.device] = None) -> Dict[str, Any]:
        """Frame ``index`` (0, 1, ...) of every stream, on ``device`` (default CPU)."""
        device = torch.device("cpu") if device is None else device
        batch = self.shape.batch_size
        travelled = EGO_SPEED_M_S * FRAME_INTERVAL_S * index
        heading = 0.02 * index  # a gentle curve, so ego rotation is exercised too
        ego_pose = torch.eye(4).repeat(batch, 1, 1)
        ego_pose[:, 0, 0] = ego_pose[:, 1, 1] = math.cos(heading)
        ego_pose[:, 0, 1], ego_pose[:, 1, 0] = -math.sin(heading), math.sin(heading)
        ego_pose[:, 0, 3] = 600.0 + travelled
        ego_pose[:, 1, 3] = 1000.0 + 200.0 * torch.arange(batch, dtype=torch.float32)  # streams far apart
        frame: Dict[str, Any] = dict(self._on_device(device))
        frame.update(
            timestamp=torch.full((batch,), FIRST_TIMESTAMP_S + FRAME_INTERVAL_S * index, dtype=torch.float64),
            ego_pose=ego_pose,
            ego_pose_inv=torch.linalg.inv(ego_pose),
            prev_exists=torch.full((batch,), 0.0 if index == 0 else 1.0),
        )
        for key in ("timestamp", "ego_pose", "ego_pose_inv", "prev_exists"):
            frame[key] = frame[key].to(device)
        frame["scene_token"] = [f"bench-scene-{row}" for row in range(batch)]
        frame["sample_token"] = [f"bench-scene-{row}-frame-{index}" for row in range(batch)]
        return frame
