"""Pictures of a nuScenes-style dataset's samples: one frame with its predictions and ground truth
(cameras and bird's-eye view), and the tracks of a scene (what evaluation, ``streampetr infer`` and
``streampetr visualize`` draw)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from streampetr_plugin.data.geometry import invert_rigid, pose_matrix, rigid_matrix
from streampetr_plugin.data.infos import CAMERA_NAMES, SampleInfo
from streampetr_plugin.errors import InputError
from streampetr_plugin.visualization.render import NUSCENES_BEV_EXTENT, render_frame
from streampetr_plugin.visualization.trajectories import render_trajectories


class VisualizationError(InputError):
    """The run directory, the sample or its predictions cannot be found; the message says which."""


def sample_lidar2img(sample: SampleInfo) -> np.ndarray:
    """(N, 4, 4) LiDAR -> pixels of the stored camera images of ``sample``, cameras in CAMERA_NAMES order."""
    projections = []
    for name in CAMERA_NAMES:
        camera = sample.cams[name]
        viewpad = np.eye(4)
        viewpad[:3, :3] = camera.intrinsic
        camera2lidar = rigid_matrix(camera.sensor2lidar_rotation, camera.sensor2lidar_translation)
        lidar2camera = invert_rigid(camera2lidar)
        projections.append(viewpad @ lidar2camera)
    return np.stack(projections)


def dataset_frame(
    dataset: Any,
    index: int,
    prediction: Mapping[str, Any],
    *,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
) -> Dict[str, Any]:
    """The keyword arguments of :func:`~streampetr_plugin.visualization.render.draw_frame` for sample
    ``index`` of a nuScenes-style dataset (``samples[index]`` a
    :class:`~streampetr_plugin.data.infos.SampleInfo`, ``load_images(index)`` its PIL images) with
    ``prediction`` (``boxes_3d`` (K, 9) bottom-centre z, ``scores_3d``, ``labels_3d``).

    Ground truth: the sample's annotations of ``class_names``, those with LiDAR or radar points (the
    boxes the metric scores). The bird's-eye view spans the dataset's detection range (its
    ``point_cloud_range``).
    """
    sample: SampleInfo = dataset.samples[index]
    range_filter = getattr(dataset, "range_filter", None)
    bev_extent = NUSCENES_BEV_EXTENT if range_filter is None else (
        range_filter.x_min, range_filter.y_min, range_filter.x_max, range_filter.y_max
    )
    keep = sample.valid_flag & np.isin(sample.gt_names, list(class_names))
    gt_labels = np.array([list(class_names).index(name) for name in sample.gt_names[keep]], dtype=np.int64)
    return dict(
        images=[np.asarray(image) for image in dataset.load_images(index)],
        lidar2img=sample_lidar2img(sample),
        gt_boxes=sample.gt_boxes[keep].reshape(-1, 7),
        gt_labels=gt_labels,
        predictions=prediction,
        class_names=class_names,
        camera_names=CAMERA_NAMES,
        score_threshold=score_threshold,
        bev_extent=bev_extent,
    )


def render_dataset_sample(
    dataset: Any,
    index: int,
    prediction: Mapping[str, Any],
    out_path: Union[str, Path],
    *,
    class_names: Sequence[str],
    score_threshold: float = 0.3,
    title: Optional[str] = None,
) -> Path:
    """Render :func:`dataset_frame` (same arguments) to a PNG at ``out_path``; returns the path."""
    sample: SampleInfo = dataset.samples[index]
    frame = dataset_frame(
        dataset, index, prediction, class_names=class_names, score_threshold=score_threshold
    )
    title = title if title is not None else f"sample {sample.token} (scene {sample.scene_token})"
    return render_frame(out_path, title=title, **frame)


def render_scene_trajectories(
    dataset: Any,
    scene_token: str,
    predictions: Mapping[str, Mapping[str, Any]],
    out_path: Union[str, Path],
    *,
    score_threshold: float = 0.3,
    title: Optional[str] = None,
) -> Path:
    """Render the tracks of scene ``scene_token`` of a nuScenes-style dataset (``samples``:
    :class:`~streampetr_plugin.data.infos.SampleInfo`) to a PNG at ``out_path``: ``predictions[token]``
    of each of its samples with ``track_ids_3d``. Returns the path."""
    samples = sorted((s for s in dataset.samples if s.scene_token == scene_token), key=lambda s: s.timestamp)
    missing = [s.token for s in samples if "track_ids_3d" not in predictions.get(s.token, {})]
    if missing:
        raise VisualizationError(
            f"scene {scene_token}: {len(missing)} of its samples have no track ids (evaluate with tracking: "
            "tracking.evaluate=true, or streampetr eval --tasks tracking)"
        )
    return render_trajectories(
        out_path,
        lidar2global=[pose_matrix(s.ego2global_rotation, s.ego2global_translation)
                      @ pose_matrix(s.lidar2ego_rotation, s.lidar2ego_translation) for s in samples],
        predictions=[predictions[s.token] for s in samples],
        gt_boxes=[s.gt_boxes[s.valid_flag] for s in samples],
        score_threshold=score_threshold,
        title=title if title is not None else f"scene {scene_token}: tracks",
    )
