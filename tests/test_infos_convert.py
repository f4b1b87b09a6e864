"""Info files built from nuScenes tables agree with nuscenes-devkit: splits, boxes, velocities, sweeps,
camera chain, 2D labels."""
from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)

from streampetr_plugin.data.geometry import invert_rigid, pose_matrix, rigid_matrix
from streampetr_plugin.data.infos import CAMERA_NAMES, CONVERTER_CLASSES, load_infos


@pytest.fixture(scope="module")
def nusc(synthetic_nuscenes):  # noqa: F811
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=synthetic_nuscenes.version, dataroot=str(synthetic_nuscenes.root), verbose=False)


@pytest.fixture(scope="module")
def train_infos(synthetic_nuscenes):  # noqa: F811
    return load_infos(synthetic_nuscenes.train_info)


def test_splits_follow_scene_names(synthetic_nuscenes, nusc, train_infos):  # noqa: F811
    val_infos = load_infos(synthetic_nuscenes.val_info)
    scene_name = {scene["token"]: scene["name"] for scene in nusc.scene}
    generated = synthetic_nuscenes.dataset
    assert {scene_name[s.scene_token] for s in train_infos.samples} == set(generated.train_scenes)
    assert {scene_name[s.scene_token] for s in val_infos.samples} == set(generated.val_scenes)
    assert len(train_infos.samples) + len(val_infos.samples) == len(nusc.sample)
    assert train_infos.version == "v1.0-mini"


def test_boxes_match_devkit_lidar_frame(nusc, train_infos):
    for info in train_infos.samples:
        sample = nusc.get("sample", info.token)
        _, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        assert len(boxes) == len(info.gt_boxes) > 0
        for box, gt in zip(boxes, info.gt_boxes):
            np.testing.assert_allclose(gt[:3], box.center, atol=1e-6)
            np.testing.assert_allclose(gt[3:6], box.wlh[[1, 0, 2]], atol=1e-9)  # (l, w, h)
            np.testing.assert_allclose(gt[6], box.orientation.yaw_pitch_roll[0], atol=1e-6)
        assert info.valid_flag.all() and (info.num_lidar_pts > 0).all()


def test_velocity_is_global_velocity_rotated_into_lidar(nusc, train_infos):
    for info in train_infos.samples:
        lidar2global = pose_matrix(info.ego2global_rotation, info.ego2global_translation) @ pose_matrix(
            info.lidar2ego_rotation, info.lidar2ego_translation
        )
        for token, velocity in zip(nusc.get("sample", info.token)["anns"], info.gt_velocity):
            expected = nusc.box_velocity(token)[:2]
            back = lidar2global[:3, :3] @ np.array([*velocity, 0.0])
            np.testing.assert_allclose(back[:2], expected, atol=1e-6)


def test_scene_starts_have_no_sweeps(nusc, train_infos):
    for info in train_infos.samples:
        assert (info.num_sweeps == 0) == (info.prev == "")
        if info.prev:
            assert info.num_sweeps == min(10, info.frame_idx)


def test_camera_chain_projects_like_devkit(nusc, train_infos):
    """A global point projected through the info's sensor2lidar + K equals the devkit camera path."""
    from nuscenes.utils.geometry_utils import view_points

    info = train_infos.samples[2]
    lidar2global = pose_matrix(info.ego2global_rotation, info.ego2global_translation) @ pose_matrix(
        info.lidar2ego_rotation, info.lidar2ego_translation
    )
    point_global = lidar2global[:3, 3] + np.array([12.0, -4.0, 0.5])
    for name in CAMERA_NAMES:
        cam = info.cams[name]
        record = nusc.get("sample_data", cam.sample_data_token)
        calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", record["ego_pose_token"])
        global2cam = invert_rigid(pose_matrix(pose["rotation"], pose["translation"])
                                  @ pose_matrix(calibration["rotation"], calibration["translation"]))
        in_cam = global2cam[:3, :3] @ point_global + global2cam[:3, 3]
        lidar2cam = invert_rigid(rigid_matrix(cam.sensor2lidar_rotation, cam.sensor2lidar_translation))
        via_info = lidar2cam @ invert_rigid(lidar2global) @ np.append(point_global, 1.0)
        np.testing.assert_allclose(via_info[:3], in_cam, atol=1e-6)
        np.testing.assert_allclose(view_points(via_info[:3, None], cam.intrinsic, normalize=False)[:, 0],
                                   np.array(calibration["camera_intrinsic"]) @ in_cam, atol=1e-6)
        assert record["sample_token"] == info.token and record["channel"] == name


def test_2d_boxes_are_projected_hulls(nusc, train_infos):
    """Recompute the 2D labels independently with the devkit's camera-frame boxes."""
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.geometry_utils import BoxVisibility, view_points

    total = 0
    for info in train_infos.samples:
        for camera, name in enumerate(CAMERA_NAMES):
            record = nusc.get("sample_data", info.cams[name].sample_data_token)
            _, boxes, intrinsic = nusc.get_sample_data(record["token"], box_vis_level=BoxVisibility.NONE)
            width, height = record["width"], record["height"]
            expected = []
            for box in boxes:
                corners = box.corners()
                corners = corners[:, corners[2] > 0]
                if box.center[2] <= 0 or corners.shape[1] == 0:
                    continue
                pixels = view_points(corners, intrinsic, normalize=True)[:2]
                x1, y1 = np.clip(pixels.min(axis=1), 0, [width, height])
                x2, y2 = np.clip(pixels.max(axis=1), 0, [width, height])
                if x2 - x1 < 1 or y2 - y1 < 1:
                    continue
                if (pixels.min(axis=1) >= 0).all() and (pixels.max(axis=1) <= [width, height]).all():
                    center = view_points(box.center[:, None], intrinsic, normalize=True)[:2, 0]
                    label = CONVERTER_CLASSES.index(category_to_detection_name(box.name))
                    expected.append((x1, y1, x2, y2, label, *center, box.center[2]))
            stored = np.concatenate(
                [info.bboxes2d[camera], info.labels2d[camera][:, None], info.centers2d[camera],
                 info.depths[camera][:, None]], axis=1,
            )
            # Every box fully inside the image must be stored exactly (hull bounds = corner bounds).
            for row in expected:
                distances = np.abs(stored - np.array(row)).max(axis=1)
                assert distances.min() < 1e-3, (name, row)
                total += 1
    assert total > 10
