"""Our info files: a JSON header and an arrays file, written and read without pickle.

``streampetr_infos_<split>.json`` (format name and version, nuScenes version, scalar and
string fields per sample, SHA-256 of the arrays file) plus ``streampetr_infos_<split>.npz``
(numeric arrays, ragged ones concatenated with offsets; read with ``allow_pickle=False``).
Paths inside are relative to the dataset root. :func:`load_info_file` also reads the reference
``.pkl`` files (:mod:`.reference_pkl`).
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from streampetr_plugin.errors import StreamPETRError, describe

from .errors import InfoFileError, missing_info_error, unusable_info_error
from .records import CAMERA_NAMES, CameraInfo, InfoSet, SampleInfo
from .reference_pkl import load_reference_pkl

INFO_FORMAT = "streampetr-nuscenes-infos"
INFO_FORMAT_VERSION = 1


def info_file_name(split: str) -> str:
    """File name of our info header for ``split`` (train, val or test)."""
    return f"streampetr_infos_{split}.json"


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
        raise missing_info_error(path, root, version)
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise unusable_info_error(path, f"is not valid JSON ({error}); truncated?", root, version) from None
    try:
        return _infos_from_header(path, header, root, version)
    except StreamPETRError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, EOFError,
            zipfile.BadZipFile) as error:  # a header or arrays file of another layout
        raise unusable_info_error(
            path, f"does not have the layout of a StreamPETR info file ({type(error).__name__}: {error})",
            root, version,
        ) from None


def _infos_from_header(path: Path, header: Any, root: Path, version: Optional[str]) -> InfoSet:
    if not isinstance(header, dict) or header.get("format") != INFO_FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise unusable_info_error(path, f"is not a StreamPETR info file (format {found!r})", root, version)
    if header["format_version"] > INFO_FORMAT_VERSION:
        raise InfoFileError(describe(
            str(path), f"has info format version {header['format_version']}; this code reads up to "
            f"{INFO_FORMAT_VERSION}", "upgrade streampetr-plugin or re-create the infos",
        ))
    version = version or header.get("nuscenes_version")
    arrays_path = path.parent / header["arrays_file"]
    if not arrays_path.exists():
        raise missing_info_error(arrays_path, root, version)
    if _sha256(arrays_path) != header["arrays_sha256"]:
        raise unusable_info_error(
            arrays_path, f"does not match the checksum recorded in {path}; damaged or replaced", root, version
        )
    with np.load(arrays_path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    records = header["samples"]
    if len(records) != header["num_samples"] or len(arrays["box_offsets"]) != len(records) + 1:
        problem = f"sample count does not match its arrays file {arrays_path}"
        raise unusable_info_error(path, problem, root, version)
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


def load_info_file(path: str | Path, *, root: str | Path | None = None,
                   version: Optional[str] = None) -> InfoSet:
    """Load our ``.json`` infos or a reference ``.pkl`` by file extension."""
    if Path(path).suffix == ".pkl":
        return load_reference_pkl(path, root=root, version=version)
    return load_infos(path, root=root, version=version)
