"""A scene's tracks from above: every track's path, the ego's path and the annotated objects.

Everything is drawn in the LiDAR frame of the scene's first sample (x to the right, y up), so paths
show how objects moved in the world while the ego drove. A track's path joins the centres of its boxes
(those scoring at least ``score_threshold``) frame by frame, in its track colour, and ends in its label
``#<track id>``; ground-truth centres are grey dots, the ego's path a black line from its start marker.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence, Union

import numpy as np

from streampetr_plugin.data.geometry import invert_rigid, transform_points
from streampetr_plugin.tracking.frame import NOT_TRACKED
from streampetr_plugin.visualization.render import track_colour

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["draw_trajectories", "render_trajectories", "track_paths"]

FIGURE_SIZE_IN = 7.0
MARGIN_M = 5.0  # around everything drawn


def _as_numpy(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def track_paths(
    lidar2global: Sequence[np.ndarray], predictions: Sequence[Mapping[str, Any]], *, score_threshold: float
) -> Dict[int, np.ndarray]:
    """``{track id: (T_k, 2) BEV centres}`` in the first frame's LiDAR frame, in frame order.

    ``lidar2global`` (T of (4, 4)) and ``predictions`` (T of ``boxes_3d`` (K, >=2), ``scores_3d`` (K,),
    ``track_ids_3d`` (K,)) follow the scene's frames in time order.
    """
    to_first = invert_rigid(np.asarray(lidar2global[0], dtype=np.float64))
    paths: Dict[int, List[np.ndarray]] = {}
    for pose, prediction in zip(lidar2global, predictions):
        boxes = _as_numpy(prediction["boxes_3d"], np.float64).reshape(-1, 9)
        scores = _as_numpy(prediction["scores_3d"], np.float64).reshape(-1)
        track_ids = _as_numpy(prediction["track_ids_3d"], np.int64).reshape(-1)
        keep = (track_ids != NOT_TRACKED) & (scores >= score_threshold)
        centres = transform_points(to_first @ np.asarray(pose, dtype=np.float64), boxes[keep, :3])
        for track_id, centre in zip(track_ids[keep], centres):
            paths.setdefault(int(track_id), []).append(centre[:2])
    return {track_id: np.array(points) for track_id, points in paths.items()}


def draw_trajectories(
    *,
    lidar2global: Sequence[np.ndarray],
    predictions: Sequence[Mapping[str, Any]],
    gt_boxes: Sequence[np.ndarray],
    score_threshold: float = 0.3,
    title: str = "",
    dpi: int = 100,
) -> "Figure":
    """The bird's-eye figure of one scene (see the module docstring).

    Args:
        lidar2global: per frame (4, 4) LiDAR -> global, frames in time order.
        predictions: per frame ``boxes_3d`` (K, 9) LiDAR frame, ``scores_3d`` (K,), ``track_ids_3d`` (K,).
        gt_boxes: per frame (M, >=3) ground-truth boxes, LiDAR frame.

    The axes are labelled ``"trajectories"``; track paths have gid ``"track_paths"`` (one line per
    track, in increasing track id), their labels ``"track_label"``, ground truth ``"gt_centres"``, the
    ego ``"ego_path"``. Size: ``7 dpi`` pixels square.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    to_first = invert_rigid(np.asarray(lidar2global[0], dtype=np.float64))
    paths = track_paths(lidar2global, predictions, score_threshold=score_threshold)
    ego = np.array([(to_first @ np.asarray(pose, dtype=np.float64))[:2, 3] for pose in lidar2global])
    gt = np.concatenate([
        transform_points(to_first @ np.asarray(pose, dtype=np.float64),
                         np.asarray(boxes, dtype=np.float64)[:, :3])
        for pose, boxes in zip(lidar2global, gt_boxes)
    ])[:, :2]

    figure = Figure(figsize=(FIGURE_SIZE_IN, FIGURE_SIZE_IN), dpi=dpi)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.scatter(gt[:, 0], gt[:, 1], s=6, color="0.6", label="ground truth centres", gid="gt_centres")
    ax.plot(ego[:, 0], ego[:, 1], color="black", linewidth=1.5, label="ego", gid="ego_path")
    ax.plot(ego[:1, 0], ego[:1, 1], marker="^", color="black", markersize=7)
    for track_id in sorted(paths):
        points = paths[track_id]
        colour = track_colour(track_id)
        ax.plot(points[:, 0], points[:, 1], color=colour, marker="o", markersize=3, linewidth=1.2,
                gid="track_paths")
        ax.text(points[-1, 0], points[-1, 1], f"#{track_id}", fontsize=7, color=colour, gid="track_label")
    everything = np.concatenate([gt, ego, *paths.values()]).reshape(-1, 2)
    low, high = everything.min(axis=0) - MARGIN_M, everything.max(axis=0) + MARGIN_M
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("x (m, first frame's LiDAR)", fontsize=8)
    ax.set_ylabel("y (m, first frame's LiDAR)", fontsize=8)
    ax.set_label("trajectories")
    ax.legend(loc="upper right", fontsize=8, title=f"{len(paths)} tracks, score >= {score_threshold:g}",
              title_fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return figure


def render_trajectories(out_path: Union[str, Path], **scene: Any) -> Path:
    """Draw :func:`draw_trajectories` (same keyword arguments) to a PNG at ``out_path``; returns it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    draw_trajectories(**scene).savefig(out_path, format="png")
    return out_path
