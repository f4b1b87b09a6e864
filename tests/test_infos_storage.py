"""Our info files: exact round trip, damaged arrays detected, a missing file names the command that
creates it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)

from streampetr_plugin.data.infos import InfoFileNotFoundError, load_info_file, load_infos, save_infos


@pytest.fixture(scope="module")
def train_infos(synthetic_nuscenes):  # noqa: F811
    return load_infos(synthetic_nuscenes.train_info)


def _assert_samples_equal(left, right):
    for a, b in zip(left.samples, right.samples):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if field.name == "cams":
                assert list(x) == list(y)
                for name in x:
                    for cam_field in dataclasses.fields(x[name]):
                        np.testing.assert_array_equal(getattr(x[name], cam_field.name),
                                                      getattr(y[name], cam_field.name))
            elif isinstance(x, list):
                assert len(x) == len(y)
                for u, v in zip(x, y):
                    np.testing.assert_array_equal(u, v)
            else:
                np.testing.assert_array_equal(x, y)


def test_round_trip_is_exact(tmp_path, train_infos):
    path = save_infos(train_infos, tmp_path / "copy.json", split="train")
    _assert_samples_equal(train_infos, load_infos(path))


def test_corrupted_arrays_are_detected(tmp_path, train_infos):
    path = save_infos(train_infos, tmp_path / "copy.json")
    arrays = path.with_suffix(".npz")
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_infos(path)


def test_missing_info_file_names_path_and_command(tmp_path):
    missing = tmp_path / "streampetr_infos_train.json"
    with pytest.raises(InfoFileNotFoundError) as error:
        load_info_file(missing, root=tmp_path, version="v1.0-mini")
    message = str(error.value)
    assert str(missing) in message
    assert f"streampetr create-data --root {tmp_path} --version v1.0-mini" in message
    with pytest.raises(InfoFileNotFoundError, match="streampetr create-data"):
        load_info_file(tmp_path / "nuscenes2d_temporal_infos_train.pkl")
