"""A scene's tracks from above: paths in the first frame's LiDAR frame, whatever the ego did."""
from __future__ import annotations

import math

import numpy as np

from streampetr_plugin.visualization.trajectories import draw_trajectories, track_paths


def _pose(x: float, y: float, yaw: float) -> np.ndarray:
    pose = np.eye(4)
    pose[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    pose[:2, 3] = x, y
    return pose


def _scene():
    """Three frames: the ego drives 5 m forward and turns; a parked car (track 4) stands at global
    (10, 3); a car (track 9) drives along global +x, 2 m per frame, from (0, -4); one untracked box."""
    poses = [_pose(5.0 * k, 0.0, 0.2 * k) for k in range(3)]
    predictions, gt = [], []
    for k, pose in enumerate(poses):
        to_lidar = np.linalg.inv(pose)
        world = np.array([[10.0, 3.0, 0.5], [2.0 * k, -4.0, 0.5], [30.0, 30.0, 0.5]])
        local = world @ to_lidar[:3, :3].T + to_lidar[:3, 3]
        boxes = np.zeros((3, 9))
        boxes[:, :3] = local
        predictions.append({"boxes_3d": boxes, "scores_3d": np.array([0.9, 0.8, 0.9]),
                            "track_ids_3d": np.array([4, 9, -1])})
        gt.append(boxes[:2, :7])
    return poses, predictions, gt


def test_paths_are_the_world_motion_seen_from_the_first_frame():
    poses, predictions, _ = _scene()
    paths = track_paths(poses, predictions, score_threshold=0.3)
    assert sorted(paths) == [4, 9]
    # the first frame's LiDAR frame is the world here (pose 0 is the identity)
    np.testing.assert_allclose(paths[4], [[10.0, 3.0]] * 3, atol=1e-9)
    np.testing.assert_allclose(paths[9], [[0.0, -4.0], [2.0, -4.0], [4.0, -4.0]], atol=1e-9)
    assert sorted(track_paths(poses, predictions, score_threshold=0.85)) == [4]


def test_the_figure_draws_one_path_per_track_the_ego_and_the_ground_truth():
    poses, predictions, gt = _scene()
    figure = draw_trajectories(lidar2global=poses, predictions=predictions, gt_boxes=gt, title="scene")
    (ax,) = [ax for ax in figure.axes if ax.get_label() == "trajectories"]
    paths = [line for line in ax.lines if line.get_gid() == "track_paths"]
    assert len(paths) == 2
    np.testing.assert_allclose(paths[1].get_xydata(), [[0.0, -4.0], [2.0, -4.0], [4.0, -4.0]], atol=1e-9)
    ego = next(line for line in ax.lines if line.get_gid() == "ego_path").get_xydata()
    np.testing.assert_allclose(ego, [[0.0, 0.0], [5.0, 0.0], [10.0, 0.0]], atol=1e-9)
    assert sorted(text.get_text() for text in ax.texts if text.get_gid() == "track_label") == ["#4", "#9"]
    gt_centres = next(c for c in ax.collections if c.get_gid() == "gt_centres").get_offsets()
    assert len(gt_centres) == 6
