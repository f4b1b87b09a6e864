"""The reference ``nuscenes2d_temporal_infos_*.pkl`` files, read through an unpickler that admits only
NumPy arrays, dtypes, scalars and builtin containers."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from streampetr_plugin.safe_loading import RestrictedUnpickler, UnsafePickleError

from .errors import create_data_command_line, missing_info_error, unusable_info_error
from .records import CameraInfo, InfoSet, SampleInfo

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
        raise missing_info_error(path, root, version)
    try:
        with open(path, "rb") as handle:
            data = RestrictedUnpickler(
                handle, path=path, allowed=lambda module, name: (module, name) in _ALLOWED_GLOBALS,
                allowed_description="NumPy arrays, dtypes, scalars and builtin containers",
                fix="only load info files from a trusted source, or re-create them with "
                f"{create_data_command_line(root, version)}",
            ).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise unusable_info_error(
            path, f"is not a readable pickle ({type(error).__name__}: {error}); truncated?", root, version
        ) from None
    if not isinstance(data, dict) or "infos" not in data:
        raise unusable_info_error(
            path, "is not a reference info file (expected a dict with 'infos' and 'metadata')", root, version
        )
    metadata = data.get("metadata") or {}
    try:
        samples = [_reference_sample(info) for info in data["infos"]]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise unusable_info_error(
            path, f"does not have the layout of a reference info file ({type(error).__name__}: {error})",
            root, version,
        ) from None
    return InfoSet(version=str(metadata.get("version", version or "")), samples=samples)
