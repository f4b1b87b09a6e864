"""The streaming dataset and loader: batch contract, prev_exists, image errors, resume."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from data_fixtures import nuscenes_dataset, synthetic_nuscenes, synthetic_params  # noqa: F401  (session fixtures)

from streampetr_plugin.data.batch import CAMERA_KEYS, IMAGE_KEYS, META_KEYS, POSE_KEYS, TARGET_KEYS
from streampetr_plugin.data.dataset import (
    ImageReadError,
    NuScenesDatasetParams,
    NuScenesStreamDataset,
)
from streampetr_plugin.data.infos import InfoFileNotFoundError, InfoSet, load_infos
from streampetr_plugin.data.collate import collate_frames
from streampetr_plugin.data.loader import build_dataloader
from streampetr_plugin.data.worker_transfer import InlineSmallTensors


@pytest.fixture(scope="module")
def train_dataset(synthetic_params):  # noqa: F811
    return nuscenes_dataset(synthetic_params, split="train")


@pytest.fixture(scope="module")
def val_dataset(synthetic_params):  # noqa: F811
    return nuscenes_dataset(synthetic_params, split="val")


def _check_contract(batch, batch_size, height, width, with_targets):
    expected = set(IMAGE_KEYS + CAMERA_KEYS + POSE_KEYS + META_KEYS)
    expected |= set(TARGET_KEYS) if with_targets else set()
    assert set(batch) == expected
    assert batch["img"].shape == (batch_size, 6, 3, height, width) and batch["img"].dtype == torch.float32
    assert height % 32 == 0 and width % 32 == 0
    for key in CAMERA_KEYS:
        assert batch[key].shape == (batch_size, 6, 4, 4) and batch[key].dtype == torch.float32
    assert batch["timestamp"].shape == (batch_size,) and batch["timestamp"].dtype == torch.float64
    assert (batch["timestamp"] > 1.5e9).all()
    for key in ("ego_pose", "ego_pose_inv"):
        assert batch[key].shape == (batch_size, 4, 4) and batch[key].dtype == torch.float32
    assert batch["prev_exists"].shape == (batch_size,) and batch["prev_exists"].dtype == torch.float32
    # ego_pose_inv is the inverse of ego_pose (translations are ~1e3 m, hence the float32 tolerance).
    identity = batch["ego_pose"].double() @ batch["ego_pose_inv"].double()
    torch.testing.assert_close(identity, torch.eye(4, dtype=torch.float64).expand_as(identity), atol=2e-4,
                               rtol=0)
    assert all(isinstance(token, str) for key in META_KEYS for token in batch[key])
    if with_targets:
        for b in range(batch_size):
            boxes, labels = batch["gt_bboxes_3d"][b], batch["gt_labels_3d"][b]
            assert boxes.dtype == torch.float32 and boxes.shape[1] == 9 and labels.dtype == torch.int64
            assert len(boxes) == len(labels) and ((labels >= 0) & (labels < 10)).all()
            for key, columns in (("gt_bboxes_2d", 4), ("centers_2d", 2)):
                assert len(batch[key][b]) == 6
                assert all(t.dtype == torch.float32 and t.shape[1] == columns for t in batch[key][b])
            assert all(t.dtype == torch.int64 for t in batch["gt_labels_2d"][b])
            assert [len(t) for t in batch["depths"][b]] == [len(t) for t in batch["gt_bboxes_2d"][b]]


def test_training_batches_follow_the_contract(train_dataset, synthetic_params):  # noqa: F811
    loader = build_dataloader(train_dataset, batch_size=2, num_workers=0, rank=0, world_size=1, seed=0,
                              training=True)
    height, width = synthetic_params.final_dim
    for batch in itertools.islice(loader, 3):
        _check_contract(batch, 2, height, width, with_targets=True)
        boxes = torch.cat(batch["gt_bboxes_3d"])
        assert (boxes[:, :2].abs() < 51.2 * 1.05 * 1.5).all()  # range-filtered, then rotated / scaled


def test_eval_batches_follow_the_contract(val_dataset, synthetic_params):  # noqa: F811
    loader = build_dataloader(val_dataset, batch_size=1, num_workers=0, rank=0, world_size=1, seed=0,
                              training=False)
    batches = list(loader)
    assert len(batches) == len(val_dataset)
    height, width = synthetic_params.final_dim
    for batch in batches:
        _check_contract(batch, 1, height, width, with_targets=False)
    timestamps = [float(batch["timestamp"][0]) for batch in batches]
    assert timestamps == sorted(timestamps)
    # Test-time lidar2img is K' @ extrinsics with K' the resized, bottom-cropped intrinsics.
    torch.testing.assert_close(batches[0]["lidar2img"], batches[0]["intrinsics"] @ batches[0]["extrinsics"])


def test_prev_exists_marks_group_and_scene_starts(train_dataset, val_dataset):
    flags = train_dataset.flag
    for index in range(len(train_dataset)):
        first_of_group = index == 0 or flags[index - 1] != flags[index]
        assert float(train_dataset[index]["prev_exists"]) == (0.0 if first_of_group else 1.0)
    assert (flags == [0, 0, 1, 1, 2, 2, 3, 3]).all()  # 2 scenes x 4 frames, seq_split_num 2
    prev = [float(val_dataset[i]["prev_exists"]) for i in range(len(val_dataset))]
    assert prev == [0.0, 1.0, 1.0, 1.0]  # one validation scene


def test_stream_rows_carry_consecutive_frames(train_dataset):
    loader = build_dataloader(train_dataset, batch_size=2, num_workers=0, rank=0, world_size=1, seed=0,
                              training=True)
    batches = list(itertools.islice(itertools.chain(loader, loader), 8))
    token_index = {sample.token: i for i, sample in enumerate(train_dataset.samples)}
    for row in range(2):
        indices = [token_index[batch["sample_token"][row]] for batch in batches]
        flags = [float(batch["prev_exists"][row]) for batch in batches]
        for step in range(1, len(indices)):
            if flags[step] == 1.0:
                assert indices[step] == indices[step - 1] + 1


def test_loader_state_resumes_where_consumption_stopped(train_dataset):
    def tokens(loader, count):
        batches = itertools.islice(itertools.chain(loader, loader, loader), count)
        return [tuple(batch["sample_token"]) for batch in batches]

    loader = build_dataloader(train_dataset, batch_size=2, num_workers=0, rank=0, world_size=1, seed=0,
                              training=True)
    full = tokens(loader, 7)
    partial = build_dataloader(train_dataset, batch_size=2, num_workers=0, rank=0, world_size=1, seed=0,
                               training=True)
    tokens(partial, 3)
    state = partial.state_dict()
    assert state["iteration"] == 3
    resumed = build_dataloader(train_dataset, batch_size=2, num_workers=0, rank=0, world_size=1, seed=0,
                               training=True)
    resumed.load_state_dict(state)
    assert full[:3] + tokens(resumed, 4) == full


def test_resumed_loader_repeats_the_augmentation_draws(train_dataset):
    def images(loader, count):
        return [batch["img"] for batch in itertools.islice(loader, count)]

    kwargs = dict(batch_size=2, rank=0, world_size=1, seed=3, training=True)
    full = images(build_dataloader(train_dataset, num_workers=0, **kwargs), 4)
    assert not torch.equal(full[2][0], full[3][0])  # frames really are augmented differently
    resumed = build_dataloader(train_dataset, num_workers=1, **kwargs)
    resumed.load_state_dict({**resumed.state_dict(), "iteration": 2})
    tail = images(resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(full[2:], tail))


def _leaves(value, path=""):
    """(path, leaf) pairs of a batch's nested dicts and lists."""
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _leaves(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [pair for index, item in enumerate(value) for pair in _leaves(item, f"{path}[{index}]")]
    return [(path, value)]


def test_worker_processes_deliver_the_same_batches(train_dataset):
    # Workers send small tensors as numpy arrays; the batches handed out must not show it.
    kwargs = dict(batch_size=2, rank=0, world_size=1, seed=0, training=True)
    in_process = list(build_dataloader(train_dataset, num_workers=0, **kwargs))
    with_worker = list(build_dataloader(train_dataset, num_workers=1, **kwargs))
    assert [batch["sample_token"] for batch in in_process] == [batch["sample_token"] for batch in with_worker]
    for expected, actual in zip(in_process, with_worker):
        expected_leaves, actual_leaves = _leaves(expected), _leaves(actual)
        assert [path for path, _ in actual_leaves] == [path for path, _ in expected_leaves]
        assert len(expected_leaves) > 40  # the per-camera targets are many small tensors
        for (path, want), (_, got) in zip(expected_leaves, actual_leaves):
            assert type(got) is type(want), path
            if isinstance(want, torch.Tensor):
                assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), path
            else:
                assert got == want, path


def test_workers_send_small_tensors_inline_and_images_shared(train_dataset):
    frames = [train_dataset[0], train_dataset[1]]
    sent = InlineSmallTensors(collate_frames)(frames)
    assert isinstance(sent["img"], torch.Tensor)  # large: one shared-memory segment
    small = [leaf for path, leaf in _leaves(sent) if not path.startswith(".img")]
    assert all(not isinstance(leaf, torch.Tensor) for leaf in small)
    assert sum(isinstance(leaf, np.ndarray) for leaf in small) > 40


def _with_image(infos: InfoSet, index: int, path: str) -> InfoSet:
    samples = list(infos.samples)
    cams = dict(samples[index].cams)
    cams["CAM_BACK"] = dataclasses.replace(cams["CAM_BACK"], data_path=path)
    samples[index] = dataclasses.replace(samples[index], cams=cams)
    return InfoSet(version=infos.version, samples=samples)


def test_missing_or_corrupt_image_names_file_and_token(tmp_path, synthetic_nuscenes):  # noqa: F811
    infos = load_infos(synthetic_nuscenes.val_info)
    token = sorted(infos.samples, key=lambda s: s.timestamp)[0].token
    index = next(i for i, s in enumerate(infos.samples) if s.token == token)
    missing = tmp_path / "missing.jpg"
    dataset = NuScenesStreamDataset(infos=_with_image(infos, index, str(missing)),
                                    root=synthetic_nuscenes.root, training=False, final_dim=(64, 160))
    with pytest.raises(ImageReadError) as error:
        dataset[0]
    assert str(missing) in str(error.value) and token in str(error.value)

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    dataset = NuScenesStreamDataset(infos=_with_image(infos, index, str(corrupt)),
                                    root=synthetic_nuscenes.root, training=False, final_dim=(64, 160))
    with pytest.raises(ImageReadError) as error:
        dataset[0]
    assert str(corrupt) in str(error.value) and token in str(error.value)

    # A readable header, then the data stops: the decoder fails, not the opening.
    original = synthetic_nuscenes.root / infos.samples[index].cams["CAM_BACK"].data_path
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(original.read_bytes()[: original.stat().st_size // 2])
    dataset = NuScenesStreamDataset(infos=_with_image(infos, index, str(truncated)),
                                    root=synthetic_nuscenes.root, training=False, final_dim=(64, 160))
    with pytest.raises(ImageReadError) as error:
        dataset[0]
    assert str(truncated) in str(error.value) and token in str(error.value)


def test_draft_decoding_reduces_the_images_and_changes_nothing_but_pixels(synthetic_params):  # noqa: F811
    reference = nuscenes_dataset(synthetic_params, split="train")
    width, height = reference.image_size(0)
    # The smallest JPEG DCT scale (1/2, 1/4, 1/8) that still covers the asked size: here 1/4.
    images = reference.load_images(0, draft_size=(width // 4 - 2, height // 4 - 2))
    assert {image.size for image in images} == {(math.ceil(width / 4), math.ceil(height / 4))}
    assert {image.size for image in reference.load_images(0)} == {(width, height)}
    # Resizing by 0.9-1.1 decodes at full size (only the kept pixels resampled: a level here and there);
    # by 0.3-0.45 at half size (the decoder's 2 x 2 downscaling before the bicubic filter).
    for resize_lim, max_levels, mean_levels in (((0.9, 1.1), 2, 0.05), ((0.3, 0.45), 64, 3)):
        params = synthetic_params.model_copy(update={"resize_lim": resize_lim, "final_dim": (32, 64)})
        theirs_dataset = nuscenes_dataset(params, split="train")
        draft_params = params.model_copy(update={"resize_path": "draft"})
        ours_dataset = nuscenes_dataset(draft_params, split="train")
        for index in (0, 5):
            ours, theirs = ours_dataset[index], theirs_dataset[index]
            assert set(ours) == set(theirs)
            for key, value in theirs.items():
                if key == "img":
                    levels = (ours[key] - value).abs() * 57.12  # about one 8-bit level per 1 / std
                    assert levels.max() <= max_levels and levels.mean() <= mean_levels, resize_lim
                elif isinstance(value, torch.Tensor):
                    assert torch.equal(ours[key], value), key
                elif isinstance(value, list):
                    assert all(torch.equal(a, b) for a, b in zip(ours[key], value)), key
                else:
                    assert ours[key] == value


def test_missing_info_file_names_the_create_data_command(synthetic_nuscenes):  # noqa: F811
    params = NuScenesDatasetParams(root=str(synthetic_nuscenes.root), version="v1.0-mini",
                                   val_info="nope.json")
    with pytest.raises(InfoFileNotFoundError) as error:
        nuscenes_dataset(params, split="val")
    message = str(error.value)
    assert str(synthetic_nuscenes.root / "nope.json") in message
    assert f"streampetr create-data --root {synthetic_nuscenes.root} --version v1.0-mini" in message


def test_params_reject_unknown_keys_and_keep_reference_defaults():
    with pytest.raises(ValueError):
        NuScenesDatasetParams(final_dims=(1, 2))
    params = NuScenesDatasetParams()
    assert params.final_dim == (320, 800) and params.resize_lim == (0.47, 0.625) and params.seq_split_num == 2
    assert params.to_rgb is False and params.mean == (103.530, 116.280, 123.675)
    assert np.allclose(params.point_cloud_range, (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))
