"""Augmentations keep images, camera matrices, 3D boxes and 2D labels consistent."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from data_fixtures import nuscenes_dataset, synthetic_nuscenes, synthetic_params  # noqa: F401  (session fixtures)
from PIL import Image

from streampetr_plugin.data.geometry import (
    box_corners,
    invert_rigid,
    matrix_to_quaternion,
    quaternion_to_matrix,
    quaternion_yaw,
    yaw_to_quaternion,
)
from streampetr_plugin.data.transforms import (
    Frame,
    GlobalRotScaleTransImage,
    ImageAugmentation,
    ObjectNameFilter,
    ObjectRangeFilter,
    ResizeCropFlipRotImage,
    filter_occluded_boxes,
    normalize_images,
    pad_images,
    resize_crop,
)


@pytest.fixture(scope="module")
def train_dataset(synthetic_params):  # noqa: F811
    return nuscenes_dataset(synthetic_params, split="train")


def _matched_labels(lidar2img, boxes_3d, bboxes_2d, centers_2d, depths, image_size):
    """For every 3D box whose projection lies fully inside a camera image, find the stored 2D label
    with the same projected centre and depth and return (stored box, projected box) pairs."""
    width, height = image_size
    corners = box_corners(boxes_3d[:, :3], boxes_3d[:, 3:6], boxes_3d[:, 6])  # (n, 8, 3)
    pairs = []
    for camera, matrix in enumerate(lidar2img):
        homogeneous = np.concatenate([corners, np.ones((*corners.shape[:2], 1))], axis=-1) @ matrix.T
        centers = np.concatenate([boxes_3d[:, :3], np.ones((len(boxes_3d), 1))], axis=1) @ matrix.T
        for i in range(len(boxes_3d)):
            if (homogeneous[i, :, 2] <= 0.1).any():
                continue
            pixels = homogeneous[i, :, :2] / homogeneous[i, :, 2:3]
            low, high = pixels.min(axis=0), pixels.max(axis=0)
            if (low < 0).any() or high[0] > width or high[1] > height or (high - low < 2).any():
                continue
            center = centers[i, :2] / centers[i, 2]
            center_error = np.abs(centers_2d[camera] - center).max(axis=1)
            distance = center_error + np.abs(depths[camera] - centers[i, 2])
            if len(distance) and distance.min() < 2e-2:
                pairs.append((bboxes_2d[camera][distance.argmin()], np.concatenate([low, high])))
    return pairs


def _assert_labels_match(frame: Frame, image_size, min_pairs: int = 5):
    pairs = _matched_labels(frame.lidar2img, frame.boxes_3d, frame.bboxes_2d, frame.centers_2d, frame.depths,
                            image_size)
    assert len(pairs) >= min_pairs
    for stored, projected in pairs:
        np.testing.assert_allclose(stored, projected, atol=2e-2)


def _copy(frame: Frame) -> Frame:
    return dataclasses.replace(
        frame, bboxes_2d=list(frame.bboxes_2d), labels_2d=list(frame.labels_2d),
        centers_2d=list(frame.centers_2d), depths=list(frame.depths),
    )


def _raw_frames(dataset):
    return [dataset.raw_frame(index) for index in range(len(dataset))]


def test_stored_2d_labels_match_projection_before_augmentation(train_dataset):
    for frame in _raw_frames(train_dataset):
        _assert_labels_match(frame, frame.images[0].size, min_pairs=2)


@pytest.mark.parametrize("flip", [False, True])
def test_labels_follow_resize_crop_flip(train_dataset, synthetic_params, flip):  # noqa: F811
    step = ResizeCropFlipRotImage(final_dim=synthetic_params.final_dim,
                                  resize_lim=synthetic_params.resize_lim,
                                  training=True)
    rng = np.random.default_rng(0)
    final_h, final_w = synthetic_params.final_dim
    for frame in _raw_frames(train_dataset):
        augmentation = dataclasses.replace(step.sample(frame.images[0].size, rng), flip=flip)
        out = step.apply(_copy(frame), augmentation)
        assert out.images[0].size == (final_w, final_h)
        np.testing.assert_allclose(out.lidar2img, out.intrinsics @ out.extrinsics)
        _assert_labels_match(out, (final_w, final_h), min_pairs=1)


def test_labels_follow_every_training_augmentation(train_dataset, synthetic_params):  # noqa: F811
    final_h, final_w = synthetic_params.final_dim
    pairs = 0
    for index in range(len(train_dataset)):
        item = train_dataset[index]
        found = _matched_labels(
            item["lidar2img"].double().numpy(), item["gt_bboxes_3d"].double().numpy(),
            [b.numpy() for b in item["gt_bboxes_2d"]], [c.numpy() for c in item["centers_2d"]],
            [d.numpy() for d in item["depths"]], (final_w, final_h),
        )
        for stored, projected in found:
            np.testing.assert_allclose(stored, projected, atol=5e-2)
        pairs += len(found)
    assert pairs >= 10


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _world_headings(pose: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    headings = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], axis=1)
    headings = headings @ pose[:3, :3].T
    return headings / np.linalg.norm(headings, axis=1, keepdims=True)


def _world_velocities(pose: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    return np.pad(boxes[:, 7:9], ((0, 0), (0, 1))) @ pose[:3, :3].T


def _project(matrices: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrices.transpose(0, 2, 1)


def test_global_augmentation_round_trips_to_the_same_world(train_dataset):
    step = GlobalRotScaleTransImage(translation_std=(0.5, 0.5, 0.2))
    frame = train_dataset.raw_frame(3)
    before = _copy(frame)
    after = step(_copy(frame), np.random.default_rng(1))
    np.testing.assert_allclose(after.ego_pose @ after.ego_pose_inv, np.eye(4), atol=1e-9)
    # Box centres, headings and velocities are the same in the global frame; sizes scale uniformly.
    np.testing.assert_allclose(_apply(after.ego_pose, after.boxes_3d[:, :3]),
                               _apply(before.ego_pose, before.boxes_3d[:, :3]), atol=1e-6)
    np.testing.assert_allclose(_world_headings(after.ego_pose, after.boxes_3d),
                               _world_headings(before.ego_pose, before.boxes_3d), atol=1e-9)
    np.testing.assert_allclose(_world_velocities(after.ego_pose, after.boxes_3d),
                               _world_velocities(before.ego_pose, before.boxes_3d), atol=1e-9)
    scale = after.boxes_3d[0, 3] / before.boxes_3d[0, 3]
    assert scale != pytest.approx(1.0)
    np.testing.assert_allclose(after.boxes_3d[:, 3:6], before.boxes_3d[:, 3:6] * scale)
    # Every camera sees an augmented point where it saw the original one.
    points = np.random.default_rng(2).uniform(-30, 30, size=(20, 3))
    augmented = _apply(after.ego_pose_inv @ before.ego_pose, points)
    np.testing.assert_allclose(_project(after.lidar2img, augmented), _project(before.lidar2img, points),
                               atol=1e-6)
    np.testing.assert_array_equal(after.intrinsics, before.intrinsics)  # only lidar2img and the poses change


def test_box_rotation_is_by_minus_the_drawn_angle():
    identity = np.eye(4)[None]
    frame = Frame(images=[], intrinsics=identity, extrinsics=identity, lidar2img=identity,
                  ego_pose=np.eye(4), ego_pose_inv=np.eye(4),
                  boxes_3d=np.array([[10.0, 0, 1, 4, 2, 1.5, 0.0, 1.0, 0.0]]), labels_3d=np.array([0]))
    step = GlobalRotScaleTransImage(rot_range=(0.5, 0.5), scale_ratio_range=(2.0, 2.0))
    out = step(frame, np.random.default_rng(0))
    expected = [20 * math.cos(-0.5), 20 * math.sin(-0.5), 2, 8, 4, 3, -0.5, 2 * math.cos(-0.5),
                2 * math.sin(-0.5)]
    np.testing.assert_allclose(out.boxes_3d[0], expected, atol=1e-12)


def test_label_transform_by_hand():
    step = ResizeCropFlipRotImage(final_dim=(64, 160), resize_lim=(1.0, 1.0), training=True,
                                  filter_invisible=False)
    frame = Frame(
        images=[Image.new("RGB", (200, 112))], intrinsics=np.eye(4)[None], extrinsics=np.eye(4)[None],
        lidar2img=np.eye(4)[None], ego_pose=np.eye(4), ego_pose_inv=np.eye(4),
        bboxes_2d=[np.array([[100, 50, 140, 90], [10, 60, 11, 80], [170, 40, 199, 70]], np.float32)],
        labels_2d=[np.array([3, 4, 5])],
        centers_2d=[np.array([[120, 70], [10.5, 70], [185, 55]], np.float32)],
        depths=[np.array([10.0, 20.0, 30.0], np.float32)],
    )
    augmentation = ImageAugmentation(resize=1.0, resize_dims=(200, 112), crop=(20, 48, 180, 112), flip=True)
    out = step.apply(frame, augmentation)
    # Box 0: shift to (80, 2, 120, 42), flip x -> 160 - x. Box 1: 0 px wide after the crop, dropped.
    # Box 2: clipped to x2 = 160 (x 150..160), flip -> 0..10; its centre is clipped then flipped.
    np.testing.assert_allclose(out.bboxes_2d[0], [[40, 2, 80, 42], [0, 0, 10, 22]])
    np.testing.assert_allclose(out.centers_2d[0], [[60, 22], [0, 7]])
    np.testing.assert_array_equal(out.labels_2d[0], [3, 5])
    np.testing.assert_allclose(out.intrinsics[0, :3, :3], [[-1, 0, 180], [0, 1, -48], [0, 0, 1]])


def test_occlusion_filter_keeps_visible_and_always_the_farthest():
    boxes = np.array([[2, 2, 8, 8], [3, 3, 6, 6], [1, 1, 9, 9], [12, 2, 18, 8]], np.float32)
    depths = np.array([30.0, 25.0, 20.0, 10.0], np.float32)
    _, _, labels, kept_depths = filter_occluded_boxes(boxes, boxes[:, :2], np.arange(4), depths,
                                                      image_hw=(10, 20))
    # Box 1 (depth 25) lies inside box 2 (depth 20): hidden. Box 0 is hidden too but, painted first with
    # index 0 like the background, always survives (the reference's behaviour).
    np.testing.assert_array_equal(labels, [0, 2, 3])
    np.testing.assert_array_equal(kept_depths, [30, 20, 10])


def test_range_and_name_filters():
    boxes = np.zeros((4, 9))
    boxes[:, 0] = [51.2, 51.19, -51.19, 0.0]
    boxes[:, 6] = [0.0, 3.5, -3.5, 7.0]
    frame = Frame(images=[], intrinsics=None, extrinsics=None, lidar2img=None, ego_pose=None,
                  ego_pose_inv=None,
                  boxes_3d=boxes, labels_3d=np.array([0, 1, -1, 9]))
    frame = ObjectRangeFilter(point_cloud_range=(-51.2, -51.2, -5, 51.2, 51.2, 3))(frame, None)
    wrapped = [3.5 - 2 * math.pi, -3.5 + 2 * math.pi, 7.0 - 2 * math.pi]
    np.testing.assert_allclose(frame.boxes_3d[:, 6], wrapped)
    frame = ObjectNameFilter(num_classes=10)(frame, None)
    np.testing.assert_array_equal(frame.labels_3d, [1, 9])


def test_normalise_bgr_and_rgb_and_pad():
    image = Image.new("RGB", (3, 2), (10, 20, 30))
    mean, std = (1.0, 2.0, 3.0), (2.0, 4.0, 8.0)
    bgr = normalize_images([image], mean=mean, std=std, to_rgb=False)
    rgb = normalize_images([image], mean=mean, std=std, to_rgb=True)
    assert bgr.shape == (1, 3, 2, 3) and bgr.dtype == np.float32
    np.testing.assert_allclose(bgr[0, :, 0, 0], [(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 8])
    np.testing.assert_allclose(rgb[0, :, 0, 0], [(10 - 1) / 2, (20 - 2) / 4, (30 - 3) / 8])
    padded = pad_images(bgr, 32)
    assert padded.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(padded[:, :, :2, :3], bgr)
    assert not padded[:, :, 2:, :].any() and not padded[:, :, :, 3:].any()


def test_normalisation_equals_the_float32_formula_on_every_pixel_value():
    values = np.arange(256, dtype=np.uint8)
    channels = [values, values[::-1], ((values.astype(int) * 7) % 256).astype(np.uint8)]
    image = Image.fromarray(np.stack(channels, axis=-1)[None])  # (1, 256, 3): every value in every channel
    mean, std = (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)
    rgb = np.asarray(image, dtype=np.float32)
    for to_rgb, order in ((True, [0, 1, 2]), (False, [2, 1, 0])):
        expected = (rgb[..., order] - np.float32(mean)) / np.float32(std)  # (1, 256, 3)
        got = normalize_images([image, image], mean=mean, std=std, to_rgb=to_rgb)
        assert got.shape == (2, 3, 1, 256)
        np.testing.assert_array_equal(got[1], expected.transpose(2, 0, 1))


@pytest.mark.parametrize("crop_x", [0, 37])
def test_resizing_only_the_kept_pixels_matches_resize_then_crop(crop_x):
    generator = np.random.default_rng(3)
    smooth = np.cumsum(generator.integers(-3, 4, (90, 160, 3)), axis=1) % 256  # structured, not noise
    image = Image.fromarray(smooth.astype(np.uint8))
    # 0.47 * 160 = 75 columns resized, a crop of 70 x 30 from the bottom; crop_x 37 runs past the right edge.
    augmentation = ImageAugmentation(resize=0.47, resize_dims=(75, 42), crop=(crop_x, 12, crop_x + 70, 42),
                                     flip=False)
    expected = np.asarray(image.resize((75, 42), Image.BICUBIC).crop(augmentation.crop), dtype=int)
    got = np.asarray(resize_crop(image, augmentation), dtype=int)
    assert got.shape == expected.shape == (30, 70, 3)
    # PIL takes the source box in float32: a filter tap can move by one step of its fixed-point weights.
    assert np.abs(got - expected).max() <= 2
    assert (got != expected).mean() < 0.01
    inside = 75 - crop_x
    assert not got[:, inside:].any() and not expected[:, inside:].any()  # beyond the resized image: black


def test_test_time_resize_is_bottom_centre_crop():
    step = ResizeCropFlipRotImage(final_dim=(320, 800), resize_lim=(0.47, 0.625), training=False)
    augmentation = step.sample((1600, 900), np.random.default_rng(0))
    assert augmentation == ImageAugmentation(resize=0.5, resize_dims=(800, 450), crop=(0, 130, 800, 450),
                                             flip=False)
    r50 = ResizeCropFlipRotImage(final_dim=(256, 704), resize_lim=(0.38, 0.55), training=False)
    assert r50.sample((1600, 900), np.random.default_rng(0)).crop == (0, 140, 704, 396)


def test_quaternion_and_rigid_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(20):
        quaternion = rng.normal(size=4)
        quaternion /= np.linalg.norm(quaternion)
        quaternion *= np.sign(quaternion[0])
        rotation = quaternion_to_matrix(quaternion)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(matrix_to_quaternion(rotation), quaternion, atol=1e-12)
        matrix = np.eye(4)
        matrix[:3, :3], matrix[:3, 3] = rotation, rng.normal(size=3) * 100
        np.testing.assert_allclose(invert_rigid(matrix) @ matrix, np.eye(4), atol=1e-12)
    for yaw in (-3.0, -0.4, 0.0, 1.2, 3.1):
        assert quaternion_yaw(yaw_to_quaternion(yaw)) == pytest.approx(yaw)
