"""The batch contract between the data pipeline and the detector.

A batch is a ``dict`` produced by :func:`streampetr_plugin.data.collate.collate_frames` (data side)
and consumed by ``StreamPETRDetector.forward`` (model side). Row ``b`` of every tensor is one frame
of stream slot ``b``: across iterations the same row always continues the same stream, so the
detector's memory row ``b`` carries that stream (the reference's sampler semantics).

Camera order is the nuScenes info order: CAM_FRONT, CAM_FRONT_RIGHT, CAM_FRONT_LEFT, CAM_BACK,
CAM_BACK_LEFT, CAM_BACK_RIGHT. The LiDAR frame is nuScenes LIDAR_TOP. Boxes use the mmdet3d
``LiDARInstance3DBoxes`` convention (x_size = length along the heading, yaw about +z, 0 along +x).

Always present (B frames, N cameras, padded image H x W; H and W multiples of 32):

=================  ======================  =====================================================
key                shape, dtype            meaning
=================  ======================  =====================================================
``img``            (B, N, 3, H, W) f32     normalised, padded network input
``intrinsics``     (B, N, 4, 4) f32        4x4 "viewpad" holding the (augmented) 3x3 K
``extrinsics``     (B, N, 4, 4) f32        LiDAR -> camera (OpenCV camera axes)
``lidar2img``      (B, N, 4, 4) f32        LiDAR -> pixels of the padded input (after augmentation)
``timestamp``      (B,) **f64**            seconds, absolute (float64 is required: ~1.5e9 s)
``ego_pose``       (B, 4, 4) f32           LiDAR -> global (after global augmentation)
``ego_pose_inv``   (B, 4, 4) f32           global -> LiDAR, rigid inverse of ``ego_pose``
``prev_exists``    (B,) f32                0 at the first frame of a stream (memory reset), else 1
``scene_token``    list[str] (B)           nuScenes scene token of each frame
``sample_token``   list[str] (B)           nuScenes sample token of each frame
=================  ======================  =====================================================

Training targets (present when the batch carries labels):

=================  ===========================================  ===================================
key                type                                         meaning
=================  ===========================================  ===================================
``gt_bboxes_3d``   list[B] of (n_b, 9) f32                      (x, y, z_gravity, x_size, y_size,
                                                                z_size, yaw, vx, vy), LiDAR frame
``gt_labels_3d``   list[B] of (n_b,) i64                        class index in the recipe's classes
``gt_bboxes_2d``   list[B] of list[N] of (m, 4) f32             (x1, y1, x2, y2) pixels of the input
``gt_labels_2d``   list[B] of list[N] of (m,) i64               2D class index
``centers_2d``     list[B] of list[N] of (m, 2) f32             projected 3D centre, pixels
``depths``         list[B] of list[N] of (m,) f32               camera-frame depth of the centre, m
=================  ===========================================  ===================================

At inference the detector derives ``prev_exists`` from changes of ``scene_token`` per row, as the
reference does (a new scene resets that row's memory); ``prev_exists`` in the batch is then ignored.
"""
from __future__ import annotations

from typing import Tuple

IMAGE_KEYS: Tuple[str, ...] = ("img",)
CAMERA_KEYS: Tuple[str, ...] = ("intrinsics", "extrinsics", "lidar2img")
POSE_KEYS: Tuple[str, ...] = ("timestamp", "ego_pose", "ego_pose_inv", "prev_exists")
META_KEYS: Tuple[str, ...] = ("scene_token", "sample_token")
TARGET_KEYS: Tuple[str, ...] = (
    "gt_bboxes_3d",
    "gt_labels_3d",
    "gt_bboxes_2d",
    "gt_labels_2d",
    "centers_2d",
    "depths",
)
