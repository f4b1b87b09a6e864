"""Pictures of one frame: the camera images and a bird's-eye view, with ground-truth and predicted boxes.

Boxes follow the batch contract (:mod:`streampetr_plugin.data.batch`): LiDAR frame, ``(x, y, z,
x_size, y_size, z_size, yaw, ...)`` with ``x_size`` along the heading and yaw about +z. Ground truth
has its z at the gravity centre, the detector's predictions at the bottom centre. Camera panels draw
the 12 edges of every box through ``lidar2img``, clipped at a near plane in front of the camera; the
bird's-eye view draws footprints (x to the right, y up) with a heading tick over the recipe's detection
range. Every panel labels each prediction with its score; where boxes stack, the label of the higher
score is kept and those that would overlap it are left out. Ground truth is dashed, predictions are
solid, colours are per class; when the predictions carry track ids (``track_ids_3d``), only tracked boxes
are drawn, coloured by track and labelled ``#<track id> <score>``.

Drawing uses matplotlib's object API on an Agg canvas (no pyplot state), imported on first use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from streampetr_plugin.data.geometry import box_corners as _corners_from_parts
from streampetr_plugin.data.infos import CAMERA_NAMES
from streampetr_plugin.tracking.frame import NOT_TRACKED

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "BOX_EDGES",
    "CAMERA_GRID",
    "NEAR_PLANE",
    "NUSCENES_BEV_EXTENT",
    "bottom_to_gravity",
    "box_corners",
    "box_edge_segments",
    "class_colour",
    "track_colour",
    "denormalize_images",
    "draw_frame",
    "project_points",
    "render_frame",
]

# Corner pairs of the 12 box edges (corner order of ``box_corners``: bottom 0-3, top 4-7).
BOX_EDGES: Tuple[Tuple[int, int], ...] = (
    (0, 1), (1, 2), (2, 3), (3, 0),
    (4, 5), (5, 6), (6, 7), (7, 4),
    (0, 4), (1, 5), (2, 6), (3, 7),
)
# Panel order of the six nuScenes cameras: front row left to right, then the back row.
CAMERA_GRID: Tuple[str, ...] = (
    "CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT",
)
NEAR_PLANE = 0.1  # m: edge parts closer to (or behind) the camera plane are not drawn
# (x_min, y_min, x_max, y_max), m: the BEV part of the nuScenes recipes' point_cloud_range
NUSCENES_BEV_EXTENT = (-51.2, -51.2, 51.2, 51.2)
SCORE_FONT_SIZE = 7.0
EDGE_SAMPLES = np.linspace(0.0, 1.0, 17)  # where a box edge is looked at to place its score label
SCORE_PAD_PX = 2.0  # the label box's padding (0.15 of the font size), in pixels at 100 dpi
BEV_TICK_MARGIN_IN = 0.55  # right of the bird's-eye view, for its tick labels and axis label
FIGURE_HEIGHT_IN = 6.0
PLOT_HEIGHT_FRACTION = 0.85  # of the figure height, for the panels (the rest: title and legend)


def _as_numpy(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """Corners (K, 8, 3) of gravity-centre boxes (K, >=7) ``(x, y, z, x_size, y_size, z_size, yaw,
    ...)``: bottom face counter-clockwise from (+x_size/2, +y_size/2) in the box frame, then the top face
    in the same order (corners 0 and 3 are the front, +x_size/2, end)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return _corners_from_parts(boxes[:, 0:3], boxes[:, 3:6], boxes[:, 6])


def bottom_to_gravity(boxes: np.ndarray) -> np.ndarray:
    """Boxes (K, >=7) with z at the bottom centre -> the same boxes with z at the gravity centre."""
    boxes = np.array(boxes, dtype=np.float64)
    boxes[:, 2] += boxes[:, 5] / 2
    return boxes


def project_points(points: np.ndarray, lidar2img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Project LiDAR points (..., 3) with a 4x4 ``lidar2img`` (viewpad @ LiDAR->camera).

    Returns ``uv`` (..., 2) pixels and ``depth`` (...) metres along the optical axis; ``uv`` is NaN
    where ``depth <= 0`` (behind the camera, where the projection means nothing).
    """
    points = np.asarray(points, dtype=np.float64)
    lidar2img = np.asarray(lidar2img, dtype=np.float64)
    camera = points @ lidar2img[:3, :3].T + lidar2img[:3, 3]  # (..., 3) = (u d, v d, d)
    depth = camera[..., 2]
    in_front = depth > 0
    safe_depth = np.where(in_front, depth, 1.0)
    uv = np.where(in_front[..., None], camera[..., :2] / safe_depth[..., None], np.nan)
    return uv, depth


def box_edge_segments(corners: np.ndarray, lidar2img: np.ndarray, near: float = NEAR_PLANE) -> np.ndarray:
    """Pixel segments (E, 2, 2) of the box edges visible to one camera.

    ``corners`` (8, 3) LiDAR frame. An edge with both corners in front of the near plane (depth >=
    ``near``) is projected as is; an edge crossing it is cut where depth equals ``near`` (depth is
    affine along a 3D segment); an edge wholly behind it is dropped.
    """
    starts = corners[[a for a, _ in BOX_EDGES]]  # (12, 3)
    ends = corners[[b for _, b in BOX_EDGES]]  # (12, 3)
    _, depth_start = project_points(starts, lidar2img)
    _, depth_end = project_points(ends, lidar2img)
    keep = (depth_start >= near) | (depth_end >= near)
    starts, ends, depth_start, depth_end = starts[keep], ends[keep], depth_start[keep], depth_end[keep]
    span = depth_end - depth_start
    with np.errstate(divide="ignore", invalid="ignore"):
        # segment parameter where the depth equals ``near``
        to_near = np.where(span != 0, (near - depth_start) / span, 0.0)
    cut_start = depth_start < near
    cut_end = depth_end < near
    new_starts = np.where(cut_start[:, None], starts + to_near[:, None] * (ends - starts), starts)
    new_ends = np.where(cut_end[:, None], starts + to_near[:, None] * (ends - starts), ends)
    uv_start, _ = project_points(new_starts, lidar2img)
    uv_end, _ = project_points(new_ends, lidar2img)
    return np.stack([uv_start, uv_end], axis=1)


def denormalize_images(
    img: Any, *, mean: Sequence[float], std: Sequence[float], to_rgb: bool
) -> np.ndarray:
    """Network input (N, 3, H, W) ``(pixel - mean) / std`` -> displayable (N, H, W, 3) uint8 RGB.

    ``to_rgb=False`` means the input channels are BGR (the V2-99 recipe), as in
    :func:`streampetr_plugin.data.transforms.normalize_images`.
    """
    pixels = _as_numpy(img, np.float32).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    pixels = pixels * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    if not to_rgb:
        pixels = pixels[..., ::-1]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def class_colour(label: int) -> Tuple[float, float, float]:
    """RGB in [0, 1] of a class index (matplotlib's tab10 cycle)."""
    from matplotlib import colormaps

    return tuple(colormaps["tab10"](int(label) % 10)[:3])


def track_colour(track_id: int) -> Tuple[float, float, float]:
    """RGB in [0, 1] of a track id (matplotlib's tab20 cycle: neighbouring ids differ)."""
    from matplotlib import colormaps

    return tuple(colormaps["tab20"](int(track_id) % 20)[:3])


def _as_boxes(value: Any) -> np.ndarray:
    """Boxes as (K, D) float64; an empty input of any shape gives (0, 9)."""
    boxes = _as_numpy(value, np.float64)
    return boxes.reshape(len(boxes), -1) if boxes.size else np.zeros((0, 9))


def _class_name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def _panel_order(camera_names: Sequence[str]) -> Sequence[int]:
    """Grid slot of each camera: nuScenes layout when the names are the six nuScenes cameras."""
    if sorted(camera_names) == sorted(CAMERA_GRID):
        return [CAMERA_GRID.index(name) for name in camera_names]
    return list(range(len(camera_names)))


@dataclass
class _Predicted:
    """The predictions a figure draws: corners (K, 8, 3), scores (K,), colours (K, 3) and label texts."""

    corners: np.ndarray
    scores: np.ndarray
    colours: np.ndarray
    texts: Sequence[str]

    def subset(self, index: Sequence[int]) -> "_Predicted":
        index = np.asarray(index, dtype=np.int64)
        return _Predicted(self.corners[index], self.scores[index], self.colours[index],
                          [self.texts[i] for i in index])


def _place_score_labels(ax: "Axes", anchors: np.ndarray, predicted: _Predicted, *, vertical: str) -> None:
    """Write each prediction's label at its anchor (data coordinates), best score first; a label that
    would overlap one already written is left out, so stacked boxes keep one legible label."""
    ax.apply_aspect()  # the final data -> pixel transform, before measuring the labels
    renderer = ax.figure.canvas.get_renderer()
    taken = []
    for index in np.argsort(-predicted.scores, kind="stable"):
        # white on the box colour: legible on camera images and on the white bird's-eye view alike
        text = ax.text(
            anchors[index, 0], anchors[index, 1], predicted.texts[index], fontsize=SCORE_FONT_SIZE,
            color="white", va=vertical, ha="left", clip_on=True, gid="score",
            bbox={"boxstyle": "square,pad=0.15", "facecolor": predicted.colours[index], "linewidth": 0},
        )
        extent = text.get_window_extent(renderer).padded(SCORE_PAD_PX)  # the coloured box around it
        if any(extent.overlaps(other) for other in taken):
            text.remove()
        else:
            taken.append(extent)


def _draw_camera(
    ax: "Axes",
    image: np.ndarray,
    lidar2img: np.ndarray,
    name: str,
    gt_corners: np.ndarray,
    gt_colours: np.ndarray,
    predicted: _Predicted,
) -> None:
    from matplotlib.collections import LineCollection

    height, width = image.shape[:2]
    ax.imshow(image)  # pixel (row i, column j) centred at (j, i), as lidar2img projects
    anchors, shown = [], []
    for gid, corners, box_colours, style in (
        ("gt_boxes", gt_corners, gt_colours, "--"),
        ("predicted_boxes", predicted.corners, predicted.colours, "-"),
    ):
        segments, colours = [], []
        for index, (box, colour) in enumerate(zip(corners, box_colours)):
            edges = box_edge_segments(box, lidar2img)
            segments.extend(edges)
            colours.extend([tuple(colour)] * len(edges))
            if gid == "predicted_boxes":
                # points along the edges (E, 17, 2); those on the image place the label
                points = edges[:, :1] + EDGE_SAMPLES[:, None] * (edges[:, 1:] - edges[:, :1])
                points = points.reshape(-1, 2)
                on_image = points[(points >= 0).all(axis=1) & (points < [width, height]).all(axis=1)]
                if len(on_image):
                    anchors.append(on_image.min(axis=0))  # the top-left corner of the visible part
                    shown.append(index)
        ax.add_collection(
            LineCollection(segments, colors=colours, linewidths=1.2, linestyles=style, gid=gid)
        )
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(name, fontsize=9)
    ax.set_axis_off()
    ax.set_label(name)
    if shown:
        _place_score_labels(ax, np.array(anchors), predicted.subset(shown), vertical="top")


def _draw_bev(
    ax: "Axes",
    gt_corners: np.ndarray,
    gt_colours: np.ndarray,
    predicted: _Predicted,
    bev_extent: Sequence[float],
) -> None:
    from matplotlib.collections import LineCollection, PolyCollection

    x_min, y_min, x_max, y_max = bev_extent

    for gid, corners, box_colours, style, fill in (
        ("gt_boxes", gt_corners, gt_colours, "--", 0.15),
        ("predicted_boxes", predicted.corners, predicted.colours, "-", 0.0),
    ):
        footprints = corners[:, :4, :2]  # (K, 4, 2) bottom face
        colours = [tuple(colour) for colour in box_colours]
        ax.add_collection(
            PolyCollection(
                footprints, closed=True, edgecolors=colours, facecolors=[(*c, fill) for c in colours],
                linewidths=1.0, linestyles=style, gid=gid,
            )
        )
        centres = footprints.mean(axis=1)  # (K, 2)
        fronts = (footprints[:, 0] + footprints[:, 3]) / 2  # middle of the +x_size/2 edge
        ax.add_collection(
            LineCollection(np.stack([centres, fronts], axis=1), colors=colours, linewidths=1.0,
                           gid=f"{gid}_heading")
        )
    ax.plot([0.0], [0.0], marker="^", color="black", markersize=6)  # the ego LiDAR, facing +y
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(y_min, y_max)
    ax.set_aspect("equal")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    # Ticks and label on the right: on the left they would run into the camera panels.
    ax.yaxis.tick_right()
    ax.yaxis.set_label_position("right")
    ax.tick_params(labelsize=7)
    ax.set_xlabel("x (m, LiDAR)", fontsize=8)
    ax.set_ylabel("y (m, LiDAR)", fontsize=8)
    ax.set_label("bev")
    top_right = predicted.corners[:, :4, :2].max(axis=1)  # (K, 2) label anchors
    inside = ((top_right[:, 0] > x_min) & (top_right[:, 0] < x_max)
              & (top_right[:, 1] > y_min) & (top_right[:, 1] < y_max))
    inside = np.flatnonzero(inside)
    _place_score_labels(ax, top_right[inside], predicted.subset(inside), vertical="bottom")


def draw_frame(
    *,
    images: Sequence[np.ndarray],
    lidar2img: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    predictions: Mapping[str, Any],
    class_names: Sequence[str],
    camera_names: Sequence[str] = CAMERA_NAMES,
    score_threshold: float = 0.3,
    bev_extent: Sequence[float] = NUSCENES_BEV_EXTENT,
    title: str = "",
    dpi: int = 100,
) -> "Figure":
    """The figure of one frame: N camera panels (two rows) and a bird's-eye view on the right.

    Args:
        images: N images (H, W, 3) uint8 RGB (all of one size).
        lidar2img: (N, 4, 4) LiDAR -> pixels of ``images``.
        gt_boxes: (M, >=7) ground truth, z at the gravity centre; ``gt_labels`` (M,) class indices.
        predictions: ``boxes_3d`` (K, >=7) z at the bottom centre, ``scores_3d`` (K,), ``labels_3d`` (K,)
            (arrays or tensors); only scores >= ``score_threshold`` are drawn. With ``track_ids_3d`` (K,)
            only tracked boxes (id != -1), coloured by track and labelled with their ids.
        class_names: names of the class indices (legend).
        bev_extent: ``(x_min, y_min, x_max, y_max)`` of the bird's-eye view, m: the detection range,
            i.e. the recipe's ``point_cloud_range`` without its z entries.

    Axes are labelled (``Axes.get_label()``) with the camera names and ``"bev"``; in each, the box
    artists have gids ``"gt_boxes"`` and ``"predicted_boxes"``, the score labels ``"score"``.
    Size in pixels: height ``6 dpi``, width ``dpi (columns * 0.85 * 6 / rows * W / H + 6)`` rounded, with
    ``columns = ceil(N / 2)`` and ``rows = 2`` (1 for a single camera).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    num_cameras = len(images)
    if len(camera_names) != num_cameras or len(lidar2img) != num_cameras:
        raise ValueError(
            f"{num_cameras} images, {len(camera_names)} camera names, {len(lidar2img)} lidar2img matrices"
        )
    gt_boxes = _as_boxes(gt_boxes)
    gt_labels = _as_numpy(gt_labels, np.int64).reshape(-1)
    scores = _as_numpy(predictions["scores_3d"], np.float64).reshape(-1)
    tracked = "track_ids_3d" in predictions
    untracked = np.full(len(scores), NOT_TRACKED)
    track_ids = _as_numpy(predictions.get("track_ids_3d", untracked), np.int64).reshape(-1)
    keep = np.flatnonzero((scores >= score_threshold) & ((track_ids != NOT_TRACKED) | (not tracked)))
    keep = keep[np.argsort(scores[keep], kind="stable")]  # low scores first: the best boxes end on top
    pred_labels = _as_numpy(predictions["labels_3d"], np.int64).reshape(-1)[keep]
    predicted = _Predicted(
        corners=box_corners(bottom_to_gravity(_as_boxes(predictions["boxes_3d"])[keep])),
        scores=scores[keep],
        colours=np.array([track_colour(track_ids[i]) if tracked else class_colour(pred_labels[j])
                          for j, i in enumerate(keep)]).reshape(-1, 3),
        texts=[f"#{track_ids[i]} {scores[i]:.2f}" if tracked else f"{scores[i]:.2f}" for i in keep],
    )
    gt_corners = box_corners(gt_boxes)
    gt_colours = np.array([class_colour(label) for label in gt_labels]).reshape(-1, 3)
    lidar2img = _as_numpy(lidar2img, np.float64)

    columns = max(1, math.ceil(num_cameras / 2))
    rows = 1 if num_cameras == 1 else 2
    height, width = images[0].shape[:2]
    panel_height = FIGURE_HEIGHT_IN * PLOT_HEIGHT_FRACTION / rows
    panel_width = panel_height * width / height
    bev_width = FIGURE_HEIGHT_IN * PLOT_HEIGHT_FRACTION
    figure_width = round((columns * panel_width + FIGURE_HEIGHT_IN) * dpi) / dpi  # whole pixels
    figure = Figure(figsize=(figure_width, FIGURE_HEIGHT_IN), dpi=dpi)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        rows, columns + 1, width_ratios=[panel_width] * columns + [bev_width],
        left=0.01, right=1.0 - BEV_TICK_MARGIN_IN / figure_width, top=0.9, bottom=0.08, wspace=0.05,
        hspace=0.12,
    )
    for camera, slot in enumerate(_panel_order(camera_names)):
        ax = figure.add_subplot(grid[slot // columns, slot % columns])
        _draw_camera(ax, images[camera], lidar2img[camera], camera_names[camera], gt_corners, gt_colours,
                     predicted)
    bev = figure.add_subplot(grid[:, columns])
    _draw_bev(bev, gt_corners, gt_colours, predicted, bev_extent)

    # class colours: of every box, or of the ground truth only when tracks colour the predictions
    present = sorted(set(gt_labels.tolist()) | (set() if tracked else set(pred_labels.tolist())))
    described = "tracks (#id score)" if tracked else "predictions"
    handles = [
        Line2D([], [], color="grey", linestyle="--", label=f"ground truth ({len(gt_boxes)})"),
        Line2D([], [], color="grey", linestyle="-",
               label=f"{described}, score >= {score_threshold:g} ({len(keep)})"),
    ] + [
        Patch(color=class_colour(label), label=_class_name(class_names, label)) for label in present
    ]
    # under the camera panels: below the bird's-eye view it would run into its axis label
    figure.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.01, 0.0), ncol=len(handles),
                  fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def render_frame(out_path: Union[str, Path], *, title: Optional[str] = None, **frame: Any) -> Path:
    """Draw one frame with :func:`draw_frame` (same keyword arguments) and save it as a PNG at
    ``out_path`` (parents created); returns the path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure = draw_frame(title=title or "", **frame)
    figure.savefig(out_path, format="png")
    return out_path
