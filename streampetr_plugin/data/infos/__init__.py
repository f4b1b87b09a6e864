"""Per-sample nuScenes info files: build them with nuscenes-devkit, store and load them without pickle.

:func:`create_infos` computes, for every key frame, what the reference converter
(``tools/data_converter/nuscenes_converter.py``, ``nuscenes2d_temporal_infos_*.pkl``) computes:
camera paths, intrinsics, camera -> LiDAR transforms at the LiDAR time, LiDAR -> ego and ego ->
global poses, timestamps, scene / prev / next links, the number of earlier LiDAR sweeps (0 marks a
scene start), 3D boxes in the LiDAR frame (gravity centre, size (l, w, h), yaw), velocities
(global -> LiDAR rotation, NaN when unknown), mapped class names, point counts, valid flags, and
per-camera 2D boxes (convex hull of the projected corners in front of the camera, clipped to the
image), 2D labels in the converter's class order, projected centres and depths.

Storage: ``streampetr_infos_<split>.json`` (format name and version, nuScenes version, scalar and
string fields per sample, SHA-256 of the arrays file) plus ``streampetr_infos_<split>.npz``
(numeric arrays, ragged ones concatenated with offsets; read with ``allow_pickle=False``).
Paths inside are relative to the dataset root. :func:`load_reference_pkl` reads the reference
``.pkl`` files through an unpickler that admits only NumPy arrays / dtypes / scalars and builtin
containers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from streampetr_plugin.errors import InputError, StreamPETRError, describe
from streampetr_plugin.safe_loading import RestrictedUnpickler, UnsafePickleError

from ..geometry import invert_rigid, pose_matrix

__all__ = [
    "CAMERA_NAMES",
    "CONVERTER_CLASSES",
    "NAME_MAPPING",
    "INFO_FORMAT",
    "INFO_FORMAT_VERSION",
    "CameraInfo",
    "SampleInfo",
    "InfoSet",
    "InfoFileNotFoundError",
    "UnsafePickleError",
    "create_infos",
    "save_infos",
    "load_infos",
    "load_reference_pkl",
    "load_info_file",
    "info_file_name",
]

logger = logging.getLogger(__name__)

CAMERA_NAMES: Tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)
# Class order of the reference converter's 2D labels (nuscenes_converter.py nus_categories).
CONVERTER_CLASSES: Tuple[str, ...] = (
    "car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle", "pedestrian",
    "traffic_cone", "barrier",
)
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
INFO_FORMAT = "streampetr-nuscenes-infos"
INFO_FORMAT_VERSION = 1
MAX_SWEEPS = 10


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


class InfoFileNotFoundError(InputError, FileNotFoundError):
    """An info file is missing; the message names the path and the command that creates it."""


class InfoFileError(InputError, ValueError):
    """An info file (or its arrays file) that exists but cannot be used: not JSON, truncated, of another
    format or layout, or not matching its checksum; the message names the file."""


def info_file_name(split: str) -> str:
    """File name of our info header for ``split`` (train, val or test)."""
    return f"streampetr_infos_{split}.json"


def _create_data_command(root: Optional[Path], version: Optional[str]) -> str:
    root_hint = str(root) if root is not None else "<nuscenes root>"
    return f"streampetr create-data --root {root_hint} --version {version or 'v1.0-trainval'}"


def _missing_info_error(path: Path, root: Optional[Path], version: Optional[str]) -> InfoFileNotFoundError:
    fix = f"create it with: {_create_data_command(root, version)}"
    return InfoFileNotFoundError(describe(str(path), "nuScenes info file not found", fix))


def _unusable_info_error(path: Path, problem: str, root: Optional[Path],
                         version: Optional[str]) -> InfoFileError:
    fix = f"re-create the infos: {_create_data_command(root, version)}"
    return InfoFileError(describe(str(path), problem, fix))


# --------------------------------------------------------------------------------------------------
# Building infos with nuscenes-devkit
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Our format: JSON header + npz
# --------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def save_infos(infos: InfoSet, path: str | Path, *, split: str = "") -> Path:
    """Write ``infos`` as ``path`` (.json header) and the sibling .npz arrays file; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays_path = path.with_suffix(".npz")
    samples = infos.samples
    num_cams = len(CAMERA_NAMES)

    def stacked(values: List[np.ndarray], shape: Tuple[int, ...], dtype) -> np.ndarray:
        return np.concatenate(values).astype(dtype) if values else np.zeros((0, *shape), dtype)

    per_camera = [sample.cams[name] for sample in samples for name in CAMERA_NAMES]
    # Names are stored as indices into a vocabulary kept in the header (fixed-width strings are large).
    all_names = np.concatenate([s.gt_names.astype(str) for s in samples] or [np.zeros(0, str)])
    vocabulary = np.unique(all_names)
    camera_2d = [(sample.bboxes2d[c], sample.labels2d[c], sample.centers2d[c], sample.depths[c])
                 for sample in samples for c in range(num_cams)]
    arrays = {
        "lidar2ego_translation": stacked([s.lidar2ego_translation[None] for s in samples], (3,), np.float64),
        "lidar2ego_rotation": stacked([s.lidar2ego_rotation[None] for s in samples], (4,), np.float64),
        "ego2global_translation": stacked([s.ego2global_translation[None] for s in samples], (3,),
                                          np.float64),
        "ego2global_rotation": stacked([s.ego2global_rotation[None] for s in samples], (4,), np.float64),
        "sensor2lidar_rotation": stacked([c.sensor2lidar_rotation[None] for c in per_camera], (3, 3),
                                         np.float64),
        "sensor2lidar_translation": stacked([c.sensor2lidar_translation[None] for c in per_camera], (3,),
                                            np.float64),
        "cam_intrinsic": stacked([c.intrinsic[None] for c in per_camera], (3, 3), np.float64),
        "box_offsets": _offsets([len(s.gt_boxes) for s in samples]),
        "gt_boxes": stacked([s.gt_boxes for s in samples], (7,), np.float64),
        "gt_name_ids": np.searchsorted(vocabulary, all_names).astype(np.int32),
        "gt_velocity": stacked([s.gt_velocity for s in samples], (2,), np.float64),
        "num_lidar_pts": stacked([s.num_lidar_pts for s in samples], (), np.int64),
        "num_radar_pts": stacked([s.num_radar_pts for s in samples], (), np.int64),
        "valid_flag": stacked([s.valid_flag for s in samples], (), bool),
        "box2d_offsets": _offsets([len(item[0]) for item in camera_2d]),
        "bboxes2d": stacked([item[0] for item in camera_2d], (4,), np.float32),
        "labels2d": stacked([item[1] for item in camera_2d], (), np.int64),
        "centers2d": stacked([item[2] for item in camera_2d], (2,), np.float32),
        "depths": stacked([item[3] for item in camera_2d], (), np.float32),
    }
    with open(arrays_path, "wb") as handle:
        np.savez(handle, **arrays)
    header = {
        "format": INFO_FORMAT,
        "format_version": INFO_FORMAT_VERSION,
        "nuscenes_version": infos.version,
        "split": split,
        "num_samples": len(samples),
        "camera_order": list(CAMERA_NAMES),
        "gt_name_vocabulary": vocabulary.tolist(),
        "arrays_file": arrays_path.name,
        "arrays_sha256": _sha256(arrays_path),
        "samples": [
            {
                "token": s.token, "scene_token": s.scene_token, "prev": s.prev, "next": s.next,
                "frame_idx": s.frame_idx, "timestamp": s.timestamp, "num_sweeps": s.num_sweeps,
                "lidar_path": s.lidar_path,
                "cams": [
                    {"data_path": s.cams[name].data_path, "timestamp": s.cams[name].timestamp,
                     "sample_data_token": s.cams[name].sample_data_token}
                    for name in CAMERA_NAMES
                ],
            }
            for s in samples
        ],
    }
    with open(path, "w") as handle:
        json.dump(header, handle)
    return path


def load_infos(path: str | Path, *, root: str | Path | None = None, version: Optional[str] = None) -> InfoSet:
    """Read an info file written by :func:`save_infos`.

    ``root`` and ``version`` only improve the error messages. Raises :class:`InfoFileNotFoundError`
    (missing header or arrays) or :class:`InfoFileError` (not JSON, wrong format or layout, newer format
    version, arrays file not matching its recorded checksum or sizes).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.exists():
        raise _missing_info_error(path, root, version)
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _unusable_info_error(path, f"is not valid JSON ({error}); truncated?", root, version) from None
    try:
        return _infos_from_header(path, header, root, version)
    except StreamPETRError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, EOFError,
            zipfile.BadZipFile) as error:  # a header or arrays file of another layout
        raise _unusable_info_error(
            path, f"does not have the layout of a StreamPETR info file ({type(error).__name__}: {error})",
            root, version,
        ) from None


def _infos_from_header(path: Path, header: Any, root: Path, version: Optional[str]) -> InfoSet:
    if not isinstance(header, dict) or header.get("format") != INFO_FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise _unusable_info_error(path, f"is not a StreamPETR info file (format {found!r})", root, version)
    if header["format_version"] > INFO_FORMAT_VERSION:
        raise InfoFileError(describe(
            str(path), f"has info format version {header['format_version']}; this code reads up to "
            f"{INFO_FORMAT_VERSION}", "upgrade streampetr-plugin or re-create the infos",
        ))
    version = version or header.get("nuscenes_version")
    arrays_path = path.parent / header["arrays_file"]
    if not arrays_path.exists():
        raise _missing_info_error(arrays_path, root, version)
    if _sha256(arrays_path) != header["arrays_sha256"]:
        raise _unusable_info_error(
            arrays_path, f"does not match the checksum recorded in {path}; damaged or replaced", root, version
        )
    with np.load(arrays_path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    records = header["samples"]
    if len(records) != header["num_samples"] or len(arrays["box_offsets"]) != len(records) + 1:
        problem = f"sample count does not match its arrays file {arrays_path}"
        raise _unusable_info_error(path, problem, root, version)
    num_cams = len(header["camera_order"])
    box_offsets, box2d_offsets = arrays["box_offsets"], arrays["box2d_offsets"]
    gt_names = np.array(header["gt_name_vocabulary"], dtype=str)[arrays["gt_name_ids"]]
    samples = []
    for i, record in enumerate(records):
        boxes = slice(box_offsets[i], box_offsets[i + 1])
        cams = {}
        for c, (name, cam_record) in enumerate(zip(header["camera_order"], record["cams"])):
            row = i * num_cams + c
            cams[name] = CameraInfo(
                data_path=cam_record["data_path"],
                timestamp=int(cam_record["timestamp"]),
                sample_data_token=cam_record["sample_data_token"],
                sensor2lidar_rotation=arrays["sensor2lidar_rotation"][row],
                sensor2lidar_translation=arrays["sensor2lidar_translation"][row],
                intrinsic=arrays["cam_intrinsic"][row],
            )
        camera_slices = [slice(box2d_offsets[i * num_cams + c], box2d_offsets[i * num_cams + c + 1])
                         for c in range(num_cams)]
        samples.append(
            SampleInfo(
                token=record["token"], scene_token=record["scene_token"], prev=record["prev"],
                next=record["next"],
                frame_idx=int(record["frame_idx"]), timestamp=int(record["timestamp"]),
                num_sweeps=int(record["num_sweeps"]), lidar_path=record["lidar_path"],
                lidar2ego_translation=arrays["lidar2ego_translation"][i],
                lidar2ego_rotation=arrays["lidar2ego_rotation"][i],
                ego2global_translation=arrays["ego2global_translation"][i],
                ego2global_rotation=arrays["ego2global_rotation"][i],
                cams=cams,
                gt_boxes=arrays["gt_boxes"][boxes],
                gt_names=gt_names[boxes],
                gt_velocity=arrays["gt_velocity"][boxes],
                num_lidar_pts=arrays["num_lidar_pts"][boxes],
                num_radar_pts=arrays["num_radar_pts"][boxes],
                valid_flag=arrays["valid_flag"][boxes],
                bboxes2d=[arrays["bboxes2d"][s] for s in camera_slices],
                labels2d=[arrays["labels2d"][s] for s in camera_slices],
                centers2d=[arrays["centers2d"][s] for s in camera_slices],
                depths=[arrays["depths"][s] for s in camera_slices],
            )
        )
    return InfoSet(version=header["nuscenes_version"], samples=samples)


# --------------------------------------------------------------------------------------------------
# The reference .pkl files, through a restricted unpickler
# --------------------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = frozenset(
    [(module, name)
     for module in ("numpy.core.multiarray", "numpy._core.multiarray")  # NumPy 1.x and 2.x paths
     for name in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("_codecs", "encode")]  # how protocol-2 pickles store bytes
    + [("builtins", name)
       for name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "complex", "slice")]
)


def _reference_sample(info: dict) -> SampleInfo:
    def array(key: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        return np.asarray(info[key], dtype=dtype).reshape(shape) if key in info else np.zeros(shape, dtype)

    num_boxes = len(info.get("gt_boxes", ()))
    cams = {
        name: CameraInfo(
            data_path=str(cam["data_path"]),
            timestamp=int(cam["timestamp"]),
            sample_data_token=str(cam.get("sample_data_token", "")),
            sensor2lidar_rotation=np.asarray(cam["sensor2lidar_rotation"], dtype=np.float64),
            sensor2lidar_translation=np.asarray(cam["sensor2lidar_translation"], dtype=np.float64),
            intrinsic=np.asarray(cam["cam_intrinsic"], dtype=np.float64),
        )
        for name, cam in info["cams"].items()
    }
    num_cams = len(cams)

    def per_camera(key: str, shape: Tuple[int, ...], dtype) -> List[np.ndarray]:
        values = info.get(key) or [np.zeros((0, *shape))] * num_cams
        return [np.asarray(v, dtype=dtype).reshape(-1, *shape) for v in values]

    num_lidar_pts = array("num_lidar_pts", (num_boxes,), np.int64)
    num_radar_pts = array("num_radar_pts", (num_boxes,), np.int64)
    return SampleInfo(
        token=str(info["token"]),
        scene_token=str(info["scene_token"]),
        prev=str(info.get("prev", "")),
        next=str(info.get("next", "")),
        frame_idx=int(info.get("frame_idx", 0)),
        timestamp=int(info["timestamp"]),
        num_sweeps=len(info.get("sweeps", [])),
        lidar_path=str(info.get("lidar_path", "")),
        lidar2ego_translation=np.asarray(info["lidar2ego_translation"], dtype=np.float64),
        lidar2ego_rotation=np.asarray(info["lidar2ego_rotation"], dtype=np.float64),
        ego2global_translation=np.asarray(info["ego2global_translation"], dtype=np.float64),
        ego2global_rotation=np.asarray(info["ego2global_rotation"], dtype=np.float64),
        cams=cams,
        gt_boxes=array("gt_boxes", (num_boxes, 7), np.float64),
        gt_names=np.asarray(info.get("gt_names", []), dtype=str).reshape(num_boxes),
        gt_velocity=array("gt_velocity", (num_boxes, 2), np.float64),
        num_lidar_pts=num_lidar_pts,
        num_radar_pts=num_radar_pts,
        valid_flag=(np.asarray(info["valid_flag"], dtype=bool).reshape(num_boxes) if "valid_flag" in info
                    else (num_lidar_pts + num_radar_pts) > 0),
        bboxes2d=per_camera("bboxes2d", (4,), np.float32),
        labels2d=[v.reshape(-1) for v in per_camera("labels2d", (), np.int64)],
        centers2d=per_camera("centers2d", (2,), np.float32),
        depths=[v.reshape(-1) for v in per_camera("depths", (), np.float32)],
    )


def load_reference_pkl(path: str | Path, *, root: str | Path | None = None,
                       version: Optional[str] = None) -> InfoSet:
    """Read a reference ``nuscenes2d_temporal_infos_*.pkl`` without executing arbitrary pickle code.

    Raises :class:`UnsafePickleError` (naming the file) when the file references anything other than
    NumPy arrays, dtypes, scalars or builtin containers, :class:`InfoFileNotFoundError` when it is
    missing, :class:`InfoFileError` when it is truncated or not a reference info file.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    if not path.exists():
        raise _missing_info_error(path, root, version)
    try:
        with open(path, "rb") as handle:
            data = RestrictedUnpickler(
                handle, path=path, allowed=lambda module, name: (module, name) in _ALLOWED_GLOBALS,
                allowed_description="NumPy arrays, dtypes, scalars and builtin containers",
                fix="only load info files from a trusted source, or re-create them with "
                f"{_create_data_command(root, version)}",
            ).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise _unusable_info_error(
            path, f"is not a readable pickle ({type(error).__name__}: {error}); truncated?", root, version
        ) from None
    if not isinstance(data, dict) or "infos" not in data:
        raise _unusable_info_error(
            path, "is not a reference info file (expected a dict with 'infos' and 'metadata')", root, version
        )
    metadata = data.get("metadata") or {}
    try:
        samples = [_reference_sample(info) for info in data["infos"]]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise _unusable_info_error(
            path, f"does not have the layout of a reference info file ({type(error).__name__}: {error})",
            root, version,
        ) from None
    return InfoSet(version=str(metadata.get("version", version or "")), samples=samples)


def load_info_file(path: str | Path, *, root: str | Path | None = None,
                   version: Optional[str] = None) -> InfoSet:
    """Load our ``.json`` infos or a reference ``.pkl`` by file extension."""
    if Path(path).suffix == ".pkl":
        return load_reference_pkl(path, root=root, version=version)
    return load_infos(path, root=root, version=version)
