"""Reference ``.pkl`` info files load through the restricted unpickler, which refuses code."""
from __future__ import annotations

import dataclasses
import os
import pickle

import numpy as np
import pytest
from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)

from streampetr_plugin.data.infos import UnsafePickleError, load_infos, load_reference_pkl


@pytest.fixture(scope="module")
def train_infos(synthetic_nuscenes):  # noqa: F811
    return load_infos(synthetic_nuscenes.train_info)


def _reference_style(train_infos) -> dict:
    """A reference-format info dict (as nuscenes_converter.py writes it) built from our infos."""
    infos = []
    for s in train_infos.samples:
        infos.append({
            "lidar_path": "./data/nuscenes/" + s.lidar_path, "token": s.token, "prev": s.prev, "next": s.next,
            "sweeps": [{"data_path": "x", "timestamp": 0}] * s.num_sweeps, "frame_idx": s.frame_idx,
            "cams": {name: {"data_path": "./data/nuscenes/" + cam.data_path, "type": name,
                            "sample_data_token": cam.sample_data_token, "timestamp": cam.timestamp,
                            "sensor2lidar_rotation": cam.sensor2lidar_rotation,
                            "sensor2lidar_translation": cam.sensor2lidar_translation,
                            "cam_intrinsic": cam.intrinsic} for name, cam in s.cams.items()},
            "scene_token": s.scene_token, "lidar2ego_translation": list(s.lidar2ego_translation),
            "lidar2ego_rotation": list(s.lidar2ego_rotation),
            "ego2global_translation": list(s.ego2global_translation),
            "ego2global_rotation": list(s.ego2global_rotation), "timestamp": s.timestamp,
            "gt_boxes": s.gt_boxes, "gt_names": s.gt_names, "gt_velocity": s.gt_velocity,
            "num_lidar_pts": s.num_lidar_pts, "num_radar_pts": s.num_radar_pts, "valid_flag": s.valid_flag,
            "bboxes2d": s.bboxes2d, "labels2d": s.labels2d, "centers2d": s.centers2d, "depths": s.depths,
            "bboxes_ignore": [np.zeros((0, 4), np.float32)] * 6, "np_scalar": np.float64(1.5),
        })
    return {"infos": infos, "metadata": {"version": "v1.0-mini"}}


@pytest.mark.parametrize("protocol", [2, 4])
def test_reference_pkl_loads_through_restricted_unpickler(tmp_path, train_infos, protocol):
    path = tmp_path / "nuscenes2d_temporal_infos_train.pkl"
    path.write_bytes(pickle.dumps(_reference_style(train_infos), protocol=protocol))
    loaded = load_reference_pkl(path)
    assert loaded.version == "v1.0-mini"
    assert [s.num_sweeps for s in loaded.samples] == [s.num_sweeps for s in train_infos.samples]
    for a, b in zip(loaded.samples, train_infos.samples):
        np.testing.assert_array_equal(a.gt_boxes, b.gt_boxes)
        np.testing.assert_array_equal(a.cams["CAM_BACK"].sensor2lidar_rotation,
                                      b.cams["CAM_BACK"].sensor2lidar_rotation)
        for u, v in zip(a.bboxes2d, b.bboxes2d):
            np.testing.assert_array_equal(u, v)
        assert a.cams["CAM_FRONT"].data_path.endswith(b.cams["CAM_FRONT"].data_path)


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"infos": [_Exploit(str(marker))], "metadata": {}}, protocol=2))
    with pytest.raises(UnsafePickleError, match="posix.mkdir|os.mkdir|nt.mkdir"):
        load_reference_pkl(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"infos": [], "metadata": {"factory": dataclasses.dataclass}}))
    with pytest.raises(pickle.UnpicklingError):
        load_reference_pkl(path)
