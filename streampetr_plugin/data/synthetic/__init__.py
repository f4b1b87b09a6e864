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

Modules: :mod:`.world` (classes, ego path, object placement), :mod:`.cameras` (the rig),
:mod:`.render` (camera images), :mod:`.lidar` (point clouds), :mod:`.tables` (the nuScenes table
writer), :mod:`.splits` (official scene names), :mod:`.generate` (:func:`make_synthetic`).
"""
from .generate import SyntheticDataset, make_synthetic
from .splits import MINI_TRAIN_SCENES, MINI_VAL_SCENES, synthetic_version
from .world import CLASS_COLOURS

__all__ = [
    "SyntheticDataset",
    "make_synthetic",
    "synthetic_version",
    "CLASS_COLOURS",
    "MINI_TRAIN_SCENES",
    "MINI_VAL_SCENES",
]
