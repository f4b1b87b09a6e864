"""Build the info files of a nuScenes version with nuscenes-devkit.

:func:`create_infos` computes, for every key frame, what the reference converter
(``tools/data_converter/nuscenes_converter.py``, ``nuscenes2d_temporal_infos_*.pkl``) computes:
camera paths, intrinsics, camera -> LiDAR transforms at the LiDAR time, LiDAR -> ego and ego ->
global poses, timestamps, scene / prev / next links, the number of earlier LiDAR sweeps (0 marks a
scene start), 3D boxes in the LiDAR frame (gravity centre, size (l, w, h), yaw), velocities
(global -> LiDAR rotation, NaN when unknown), mapped class names, point counts, valid flags, and
per-camera 2D boxes (convex hull of the projected corners in front of the camera, clipped to the
image), 2D labels in the converter's class order, projected centres and depths.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..geometry import invert_rigid, pose_matrix
from .records import CAMERA_NAMES, CONVERTER_CLASSES, CameraInfo, InfoSet, SampleInfo
from .storage import info_file_name, save_infos

logger = logging.getLogger(__name__)

# nuScenes category -> detection class (mmdet3d NuScenesDataset.NameMapping).
NAME_MAPPING: Dict[str, str] = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}
MAX_SWEEPS = 10


def _split_scene_names(version: str) -> Dict[str, Sequence[str]]:
    from nuscenes.utils import splits

    if version == "v1.0-trainval":
        return {"train": splits.train, "val": splits.val}
    if version == "v1.0-mini":
        return {"train": splits.mini_train, "val": splits.mini_val}
    if version == "v1.0-test":
        return {"test": splits.test}
    raise ValueError(f"unknown nuScenes version {version!r} (expected v1.0-trainval, v1.0-mini or v1.0-test)")


def _camera_annotations_2d(nusc, camera_token: str, width: int, height: int):
    """Per-camera 2D labels as the reference converter computes them (get_2d_boxes + its filters).

    Returns (bboxes (k, 4) f32, labels (k,) i64, centers (k, 2) f32, depths (k,) f32).
    """
    from shapely.geometry import MultiPoint, box

    camera_record = nusc.get("sample_data", camera_token)
    calibration = nusc.get("calibrated_sensor", camera_record["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", camera_record["ego_pose_token"])
    intrinsic = np.array(calibration["camera_intrinsic"], dtype=np.float64)
    global2cam = invert_rigid(pose_matrix(pose["rotation"], pose["translation"]) @
                              pose_matrix(calibration["rotation"], calibration["translation"]))
    canvas = box(0, 0, width, height)
    bboxes, labels, centers, depths = [], [], [], []
    for annotation_token in nusc.get("sample", camera_record["sample_token"])["anns"]:
        annotation = nusc.get("sample_annotation", annotation_token)
        name = NAME_MAPPING.get(annotation["category_name"])
        if name is None:
            continue
        box_global = nusc.get_box(annotation_token)
        corners = box_global.corners().T @ global2cam[:3, :3].T + global2cam[:3, 3]  # (8, 3) camera frame
        corners = corners[corners[:, 2] > 0]
        if len(corners) == 0:
            continue
        projected = corners @ intrinsic.T
        hull = MultiPoint(projected[:, :2] / projected[:, 2:3]).convex_hull
        if not hull.intersects(canvas):
            continue
        x1, y1, x2, y2 = hull.intersection(canvas).bounds
        center = global2cam[:3, :3] @ box_global.center + global2cam[:3, 3]
        if center[2] <= 0:
            continue
        # Filters of _fill_trainval_infos: some overlap with the image, positive area, >= 1 px sides.
        overlap = max(0.0, min(x2, width) - max(x1, 0.0)) * max(0.0, min(y2, height) - max(y1, 0.0))
        if overlap == 0 or (x2 - x1) * (y2 - y1) <= 0 or x2 - x1 < 1 or y2 - y1 < 1:
            continue
        center_pixel = intrinsic @ center
        bboxes.append([x1, y1, x2, y2])
        labels.append(CONVERTER_CLASSES.index(name))
        centers.append(center_pixel[:2] / center_pixel[2])
        depths.append(center[2])
    return (
        np.array(bboxes, dtype=np.float32).reshape(-1, 4),
        np.array(labels, dtype=np.int64),
        np.array(centers, dtype=np.float32).reshape(-1, 2),
        np.array(depths, dtype=np.float32),
    )


def _image_size(root: Path, record: dict) -> Tuple[int, int]:
    if record.get("width") and record.get("height"):
        return int(record["width"]), int(record["height"])
    from PIL import Image

    with Image.open(root / record["filename"]) as image:
        return image.size


def _camera_infos(nusc, root: Path, sample: dict, global2lidar: np.ndarray, with_annotations: bool):
    """(cams {name: CameraInfo}, per-camera 2D labels (bboxes, labels, centres, depths) lists)."""
    cams: Dict[str, CameraInfo] = {}
    labels_2d: Tuple[list, list, list, list] = ([], [], [], [])
    for name in CAMERA_NAMES:
        record = nusc.get("sample_data", sample["data"][name])
        calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", record["ego_pose_token"])
        # camera -> ego (camera time) -> global -> ego (LiDAR time) -> LiDAR
        cam2lidar = (global2lidar @ pose_matrix(pose["rotation"], pose["translation"])
                     @ pose_matrix(calibration["rotation"], calibration["translation"]))
        cams[name] = CameraInfo(
            data_path=record["filename"],
            timestamp=int(record["timestamp"]),
            sample_data_token=record["token"],
            sensor2lidar_rotation=cam2lidar[:3, :3],
            sensor2lidar_translation=cam2lidar[:3, 3],
            intrinsic=np.array(calibration["camera_intrinsic"], dtype=np.float64),
        )
        if with_annotations:
            width, height = _image_size(root, record)
            camera_labels = _camera_annotations_2d(nusc, record["token"], width, height)
        else:
            camera_labels = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                             np.zeros((0, 2), np.float32), np.zeros(0, np.float32))
        for values, value in zip(labels_2d, camera_labels):
            values.append(value)
    return cams, labels_2d


def _annotations_3d(nusc, annotation_tokens: Sequence[str], global2lidar: np.ndarray):
    """LiDAR-frame (boxes (M, 7), names (M,), velocities (M, 2), num_lidar_pts (M,), num_radar_pts (M,))."""
    annotations = [nusc.get("sample_annotation", token) for token in annotation_tokens]
    boxes = np.zeros((len(annotations), 7))
    velocities = np.zeros((len(annotations), 2))
    names = []
    for i, annotation in enumerate(annotations):
        box = nusc.get_box(annotation["token"])
        center = global2lidar[:3, :3] @ box.center + global2lidar[:3, 3]
        rotation = global2lidar[:3, :3] @ box.rotation_matrix
        width, length, height = box.wlh
        boxes[i] = [*center, length, width, height, np.arctan2(rotation[1, 0], rotation[0, 0])]
        velocity_global = np.array([*nusc.box_velocity(annotation["token"])[:2], 0.0])
        velocities[i] = (global2lidar[:3, :3] @ velocity_global)[:2]  # rotation only; NaN stays NaN
        names.append(NAME_MAPPING.get(annotation["category_name"], annotation["category_name"]))
    num_lidar_pts = np.array([a["num_lidar_pts"] for a in annotations], dtype=np.int64)
    num_radar_pts = np.array([a["num_radar_pts"] for a in annotations], dtype=np.int64)
    return boxes, np.array(names, dtype=str), velocities, num_lidar_pts, num_radar_pts


def _sample_info(nusc, root: Path, sample: dict, frame_idx: int, with_annotations: bool) -> SampleInfo:
    lidar_record = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    lidar_calibration = nusc.get("calibrated_sensor", lidar_record["calibrated_sensor_token"])
    lidar_pose = nusc.get("ego_pose", lidar_record["ego_pose_token"])
    lidar2ego = pose_matrix(lidar_calibration["rotation"], lidar_calibration["translation"])
    ego2global = pose_matrix(lidar_pose["rotation"], lidar_pose["translation"])
    global2lidar = invert_rigid(ego2global @ lidar2ego)
    cams, labels_2d = _camera_infos(nusc, root, sample, global2lidar, with_annotations)
    bboxes2d, labels2d, centers2d, depths = labels_2d
    num_sweeps, record = 0, lidar_record
    while num_sweeps < MAX_SWEEPS and record["prev"]:
        num_sweeps += 1
        record = nusc.get("sample_data", record["prev"])
    gt_boxes, gt_names, gt_velocity, num_lidar_pts, num_radar_pts = _annotations_3d(
        nusc, sample["anns"] if with_annotations else [], global2lidar
    )
    return SampleInfo(
        token=sample["token"],
        scene_token=sample["scene_token"],
        prev=sample["prev"],
        next=sample["next"],
        frame_idx=frame_idx,
        timestamp=int(sample["timestamp"]),
        num_sweeps=num_sweeps,
        lidar_path=lidar_record["filename"],
        lidar2ego_translation=np.array(lidar_calibration["translation"], dtype=np.float64),
        lidar2ego_rotation=np.array(lidar_calibration["rotation"], dtype=np.float64),
        ego2global_translation=np.array(lidar_pose["translation"], dtype=np.float64),
        ego2global_rotation=np.array(lidar_pose["rotation"], dtype=np.float64),
        cams=cams,
        gt_boxes=gt_boxes,
        gt_names=gt_names,
        gt_velocity=gt_velocity,
        num_lidar_pts=num_lidar_pts,
        num_radar_pts=num_radar_pts,
        valid_flag=(num_lidar_pts + num_radar_pts) > 0,
        bboxes2d=bboxes2d,
        labels2d=labels2d,
        centers2d=centers2d,
        depths=depths,
    )


def create_infos(root: str | Path, version: str, out_dir: str | Path | None = None) -> Dict[str, Path]:
    """Build the info files of every split of ``version`` found under ``root``.

    Writes ``streampetr_infos_{train,val}.json/.npz`` (``test`` for v1.0-test) into ``out_dir``
    (default ``root``) and returns {split: path of the .json header}. Scenes whose LiDAR files are
    missing are skipped with a warning, as the reference converter does.
    """
    from nuscenes.nuscenes import NuScenes

    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    split_scenes = _split_scene_names(version)
    nusc = NuScenes(version=version, dataroot=str(root), verbose=False)
    scene_split: Dict[str, str] = {}
    for scene in nusc.scene:
        first_sample = nusc.get("sample", scene["first_sample_token"])
        lidar_file = root / nusc.get("sample_data", first_sample["data"]["LIDAR_TOP"])["filename"]
        if not lidar_file.exists():
            logger.warning("skipping scene %s: %s does not exist", scene["name"], lidar_file)
            continue
        for split, names in split_scenes.items():
            if scene["name"] in names:
                scene_split[scene["token"]] = split
    with_annotations = version != "v1.0-test"
    infos: Dict[str, List[SampleInfo]] = {split: [] for split in split_scenes}
    frame_idx = 0
    for sample in nusc.sample:
        split = scene_split.get(sample["scene_token"])
        info = _sample_info(nusc, root, sample, frame_idx, with_annotations)
        frame_idx = 0 if sample["next"] == "" else frame_idx + 1
        if split is not None:
            infos[split].append(info)
    paths = {}
    for split, samples in infos.items():
        paths[split] = save_infos(InfoSet(version=version, samples=samples), out_dir / info_file_name(split),
                                  split=split)
        logger.info("%s: %d samples -> %s", split, len(samples), paths[split])
    return paths
