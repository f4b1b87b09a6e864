"""Pictures of a frame: box geometry by hand, the drawn figure, the PNG, and `streampetr visualize`."""
import io
import math

import numpy as np
import pytest
import torch
from data_fixtures import nuscenes_dataset, synthetic_nuscenes  # noqa: F401  (session fixture)
from PIL import Image

from streampetr_plugin import load_recipe
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.config.loader import dump_recipe
from streampetr_plugin.data.dataset import NuScenesDatasetParams
from streampetr_plugin.data.infos import CAMERA_NAMES
from streampetr_plugin.data.transforms import normalize_images
from streampetr_plugin.evaluation.predictions import predictions_path, save_predictions
from streampetr_plugin.visualization.command import visualize_command
from streampetr_plugin.visualization.dataset_pictures import VisualizationError, dataset_frame, sample_lidar2img
from streampetr_plugin.visualization.render import (
    bottom_to_gravity,
    box_corners,
    box_edge_segments,
    class_colour,
    denormalize_images,
    draw_frame,
    project_points,
    render_frame,
    track_colour,
)

FOCAL, CX, CY = 100.0, 80.0, 45.0
WIDTH, HEIGHT = 160, 90


def forward_camera() -> np.ndarray:
    """lidar2img of a camera at the LiDAR origin looking along +y: camera x = LiDAR x, camera y
    (down) = -LiDAR z, camera z (depth) = LiDAR y; K = [[100, 0, 80], [0, 100, 45], [0, 0, 1]]."""
    extrinsic = np.array([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    viewpad = np.eye(4)
    viewpad[:3, :3] = [[FOCAL, 0, CX], [0, FOCAL, CY], [0, 0, 1]]
    return viewpad @ extrinsic


def test_box_corners_of_a_rotated_box_by_hand():
    # centre (1, 2, 3), length 4 along the heading, width 2, height 2, heading +y (yaw 90 deg)
    corners = box_corners(np.array([[1.0, 2.0, 3.0, 4.0, 2.0, 2.0, math.pi / 2, 0.5, 0.5]]))
    assert corners.shape == (1, 8, 3)
    # corner 0 is (+l/2, +w/2, -h/2) in the box frame = (+2, +1, -1) -> rotated (-1, +2, -1)
    np.testing.assert_allclose(corners[0, 0], [0.0, 4.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(corners[0, 2], [2.0, 0.0, 2.0], atol=1e-12)  # (-2, -1, -1) -> (1, -2, -1)
    np.testing.assert_allclose(corners[0, 6], [2.0, 0.0, 4.0], atol=1e-12)  # top of corner 2
    np.testing.assert_allclose(corners[0].mean(axis=0), [1.0, 2.0, 3.0], atol=1e-12)


def test_bottom_centre_boxes_are_lifted_by_half_their_height():
    boxes = np.array([[1.0, 2.0, -1.0, 4.0, 2.0, 3.0, 0.3, 0.0, 0.0]])
    lifted = bottom_to_gravity(boxes)
    assert lifted[0, 2] == 0.5 and boxes[0, 2] == -1.0  # the input is not modified
    assert box_corners(lifted)[0, :, 2].min() == pytest.approx(-1.0)


def test_project_points_by_hand():
    points = np.array([[1.0, 11.0, 1.0], [0.0, 10.0, 0.0], [0.0, -5.0, 0.0]])
    uv, depth = project_points(points, forward_camera())
    np.testing.assert_allclose(depth, [11.0, 10.0, -5.0])
    np.testing.assert_allclose(uv[0], [CX + FOCAL * 1 / 11, CY - FOCAL * 1 / 11])  # above and right of centre
    np.testing.assert_allclose(uv[1], [CX, CY])
    assert np.isnan(uv[2]).all()  # behind the camera


def test_box_in_front_projects_all_twelve_edges_onto_its_corners():
    corners = box_corners(np.array([[0.0, 10.0, 0.0, 2.0, 2.0, 2.0, 0.0]]))[0]
    segments = box_edge_segments(corners, forward_camera())
    assert segments.shape == (12, 2, 2)
    # corner 0 = (1, 11, -1): u = 80 + 100 / 11, v = 45 + 100 / 11
    np.testing.assert_allclose(segments[0, 0], [CX + FOCAL / 11, CY + FOCAL / 11])
    # corner 6 = (-1, 9, 1): u = 80 - 100 / 9, v = 45 - 100 / 9 (end of edge (5, 6))
    np.testing.assert_allclose(segments[5, 1], [CX - FOCAL / 9, CY - FOCAL / 9])


def test_edges_crossing_the_camera_plane_are_cut_at_the_near_plane():
    corners = box_corners(np.array([[0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 0.0]]))[0]  # y from -0.5 to 1.5
    segments = box_edge_segments(corners, forward_camera(), near=0.1)
    # 4 edges lie wholly at depth -0.5 (dropped), 4 cross the plane (cut), 4 lie in front
    assert segments.shape == (8, 2, 2)
    assert np.isfinite(segments).all()
    # edge (1, 2) runs from (-1, 1.5, -1) to (-1, -0.5, -1): cut at (-1, 0.1, -1) -> (80 - 1000, 45 + 1000)
    expected = [[CX - FOCAL / 1.5, CY + FOCAL / 1.5], [CX - 1000.0, CY + 1000.0]]
    np.testing.assert_allclose(segments[1], expected)


@pytest.mark.parametrize("to_rgb", [False, True])
def test_denormalize_inverts_the_network_normalisation(to_rgb):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 8, 12, 3), dtype=np.uint8)
    mean, std = (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)
    normalised = normalize_images([Image.fromarray(p) for p in pixels], mean=mean, std=std, to_rgb=to_rgb)
    restored = denormalize_images(torch.from_numpy(normalised), mean=mean, std=std, to_rgb=to_rgb)
    np.testing.assert_array_equal(restored, pixels)


def one_camera_frame(**overrides):
    frame = dict(
        images=[np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)],
        lidar2img=forward_camera()[None],
        camera_names=["CAM_TEST"],
        gt_boxes=np.array([[0.0, 10.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]),  # gravity centre
        gt_labels=np.array([0]),
        predictions={
            "boxes_3d": torch.tensor([[2.0, 10.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0],  # bottom centre
                                      [-20.0, 30.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]),
            "scores_3d": torch.tensor([0.8, 0.1]),
            "labels_3d": torch.tensor([1, 2]),
        },
        class_names=["car", "truck", "bus"],
        score_threshold=0.3,
    )
    frame.update(overrides)
    return frame


def axes_by_label(figure):
    return {ax.get_label(): ax for ax in figure.axes}


def collection(ax, gid):
    return next(c for c in ax.collections if c.get_gid() == gid)


def test_camera_panel_draws_boxes_where_the_geometry_says():
    figure = draw_frame(**one_camera_frame())
    camera = axes_by_label(figure)["CAM_TEST"]
    gt_segments = collection(camera, "gt_boxes").get_segments()
    predicted = collection(camera, "predicted_boxes").get_segments()
    assert len(gt_segments) == 12 and len(predicted) == 12  # the 0.1-score box is not drawn
    # the prediction spans x 1..3, y 9..11, z -1..1 (bottom at -1): corner 0 = (3, 11, -1)
    np.testing.assert_allclose(predicted[0][0], [CX + 3 * FOCAL / 11, CY + FOCAL / 11])
    np.testing.assert_allclose(gt_segments[0][0], [CX + FOCAL / 11, CY + FOCAL / 11])
    np.testing.assert_allclose(collection(camera, "predicted_boxes").get_colors()[0][:3], class_colour(1))


def test_bev_shows_ground_truth_and_predictions_with_scores():
    figure = draw_frame(**one_camera_frame())
    bev = axes_by_label(figure)["bev"]
    gt_footprint = collection(bev, "gt_boxes").get_paths()[0].vertices[:4]
    predicted = collection(bev, "predicted_boxes").get_paths()
    assert len(predicted) == 1
    np.testing.assert_allclose(gt_footprint, [[1, 11], [-1, 11], [-1, 9], [1, 9]], atol=1e-9)
    np.testing.assert_allclose(predicted[0].vertices[:4], [[3, 11], [1, 11], [1, 9], [3, 9]], atol=1e-9)
    heading = collection(bev, "predicted_boxes_heading").get_segments()[0]
    np.testing.assert_allclose(heading, [[2, 10], [3, 10]], atol=1e-9)  # centre -> front (yaw 0: +x)
    assert [text.get_text() for text in bev.texts if text.get_gid() == "score"] == ["0.80"]


def test_tracked_predictions_are_coloured_by_track_and_untracked_ones_left_out():
    predictions = {
        "boxes_3d": torch.tensor([[2.0, 10.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0],
                                  [-12.0, 25.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0],
                                  [0.0, 20.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]),
        "scores_3d": torch.tensor([0.8, 0.7, 0.9]),
        "labels_3d": torch.tensor([1, 1, 1]),
        "track_ids_3d": torch.tensor([5, 6, -1]),
    }
    figure = draw_frame(**one_camera_frame(predictions=predictions))
    bev = axes_by_label(figure)["bev"]
    drawn = collection(bev, "predicted_boxes")
    assert len(drawn.get_paths()) == 2  # the untracked box is not drawn
    # low scores are drawn first: track 6 (0.7), then track 5 (0.8)
    np.testing.assert_allclose(drawn.get_edgecolors()[:, :3], [track_colour(6), track_colour(5)])
    assert track_colour(5) != track_colour(6)
    labels = sorted(text.get_text() for text in bev.texts if text.get_gid() == "score")
    assert labels == ["#5 0.80", "#6 0.70"]


def score_texts(ax):
    return [text for text in ax.texts if text.get_gid() == "score"]


def test_bev_spans_the_given_detection_range():
    figure = draw_frame(**one_camera_frame(bev_extent=(-25.0, -20.0, 25.0, 30.0)))
    bev = axes_by_label(figure)["bev"]
    assert bev.get_xlim() == (-25.0, 25.0) and bev.get_ylim() == (-20.0, 30.0)


def test_camera_views_label_each_prediction_with_its_score():
    predictions = {
        "boxes_3d": torch.tensor([[2.0, 10.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0],
                                  [-3.0, 12.0, -1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
                                  [0.0, -10.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]),  # behind the camera
        "scores_3d": torch.tensor([0.8, 0.45, 0.9]),
        "labels_3d": torch.tensor([1, 2, 0]),
    }
    figure = draw_frame(**one_camera_frame(predictions=predictions))
    camera = axes_by_label(figure)["CAM_TEST"]
    texts = score_texts(camera)
    assert sorted(text.get_text() for text in texts) == ["0.45", "0.80"]
    for text in texts:
        u, v = text.get_position()
        assert 0 <= u < WIDTH and 0 <= v < HEIGHT


def test_labels_of_stacked_boxes_do_not_overlap_and_the_best_score_shows():
    stack = [[5.0 + 0.1 * k, 10.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0] for k in range(4)]
    apart = [[-15.0, -15.0, -1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]]
    predictions = {
        "boxes_3d": torch.tensor(stack + apart),
        "scores_3d": torch.tensor([0.5, 0.9, 0.7, 0.6, 0.4]),
        "labels_3d": torch.tensor([0, 0, 1, 2, 1]),
    }
    figure = draw_frame(**one_camera_frame(predictions=predictions))
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        extents = [text.get_window_extent(renderer) for text in score_texts(ax)]
        for i, first in enumerate(extents):
            assert not any(first.overlaps(second) for second in extents[i + 1:]), ax.get_label()
    shown = sorted(text.get_text() for text in score_texts(axes_by_label(figure)["bev"]))
    assert shown == ["0.40", "0.90"]  # the box apart and the best of the stack


def test_bev_axis_labels_stay_clear_of_the_camera_panels():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in CAMERA_NAMES]
    lidar2img = np.stack([forward_camera()] * len(CAMERA_NAMES))
    figure = draw_frame(**one_camera_frame(images=images, lidar2img=lidar2img, camera_names=CAMERA_NAMES))
    renderer = figure.canvas.get_renderer()
    axes = axes_by_label(figure)
    bev_with_labels = axes["bev"].get_tightbbox(renderer)  # ticks, tick labels and axis labels
    for name in CAMERA_NAMES:
        assert not bev_with_labels.overlaps(axes[name].get_window_extent(renderer)), name
    assert bev_with_labels.x1 <= figure.bbox.x1  # nothing cut off at the right edge
    legend = figure.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(bev_with_labels)


def test_png_pixels_show_the_projected_prediction():
    figure = draw_frame(**one_camera_frame())
    figure.canvas.draw()
    camera = axes_by_label(figure)["CAM_TEST"]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    png = np.asarray(Image.open(buffer).convert("RGB")).astype(int)
    height = png.shape[0]

    def pixel(uv):
        x, y = camera.transData.transform(uv)  # display pixels, origin bottom left
        return png[int(height - y), int(x)]

    # middle of the prediction's near bottom edge (2, 3): corners (1, 9, -1) and (3, 9, -1), depth 9
    on_edge = np.array([CX + 2 * FOCAL / 9, CY + FOCAL / 9])
    colour = np.array(class_colour(1)) * 255
    assert np.abs(pixel(on_edge) - colour).max() < 60
    assert (pixel([20.0, 20.0]) > 245).all()  # away from every box: the white image


def test_render_frame_writes_a_png_of_the_documented_size(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in CAMERA_NAMES]
    lidar2img = np.stack([forward_camera()] * len(CAMERA_NAMES))
    frame = one_camera_frame(images=images, lidar2img=lidar2img, camera_names=CAMERA_NAMES)
    path = render_frame(tmp_path / "sub" / "frame.png", title="six cameras", **frame)
    with Image.open(path) as image:
        assert image.format == "PNG"
        # width: 100 dpi x (3 columns x (0.85 x 6 / 2 rows) x 160 / 90 + 6) = 1960; height 100 x 6
        assert image.size == (1960, 600)


# ------------------------------------------------------------------------------------- the command


@pytest.fixture
def run_dir(tmp_path, synthetic_nuscenes):  # noqa: F811
    recipe = load_recipe("r50_8p", [
        f"data.val.root={synthetic_nuscenes.root}",
        "data.val.version=v1.0-mini",
        "data.val.final_dim=[64,160]",
        f"runtime.work_dir={tmp_path}",
    ])
    (tmp_path / "recipe.yaml").write_text(dump_recipe(recipe))  # as the trainer does
    return tmp_path


def val_dataset(synthetic_nuscenes):  # noqa: F811
    params = NuScenesDatasetParams(root=str(synthetic_nuscenes.root), version="v1.0-mini", final_dim=(64, 160))
    return nuscenes_dataset(params, split="val")


def test_visualize_renders_the_first_val_sample_of_the_newest_predictions(
    run_dir, synthetic_nuscenes  # noqa: F811
):
    dataset = val_dataset(synthetic_nuscenes)
    first, second = dataset.samples[0], dataset.samples[1]
    gt = first.gt_boxes[:2].copy()
    gt[:, 2] -= gt[:, 5] / 2  # predictions carry the bottom centre
    prediction = {"boxes_3d": np.concatenate([gt, np.zeros((2, 2))], axis=1), "scores_3d": [0.9, 0.5],
                  "labels_3d": [0, 1]}
    save_predictions({first.token: prediction, second.token: prediction}, predictions_path(run_dir, 4))
    newest = predictions_path(run_dir, 12)
    save_predictions({first.token: prediction, second.token: prediction}, newest)

    path = visualize_command(run_dir, host=create_plugin_host())
    assert path == newest.parent / f"sample_{first.token}.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[1] == 600

    chosen = visualize_command(str(run_dir), sample=second.token, out=run_dir / "second.png",
                               host=create_plugin_host())
    assert chosen == run_dir / "second.png" and chosen.is_file()


def test_a_dataset_frame_spans_the_dataset_detection_range(synthetic_nuscenes):  # noqa: F811
    params = NuScenesDatasetParams(
        root=str(synthetic_nuscenes.root), version="v1.0-mini", final_dim=(64, 160),
        point_cloud_range=(-25.0, -20.0, -5.0, 25.0, 30.0, 3.0),
    )
    dataset = nuscenes_dataset(params, split="val")
    empty = {"boxes_3d": np.zeros((0, 9)), "scores_3d": [], "labels_3d": []}
    frame = dataset_frame(dataset, 0, empty, class_names=dataset.classes)
    assert tuple(frame["bev_extent"]) == (-25.0, -20.0, 25.0, 30.0)


def test_sample_projection_puts_box_centres_on_the_converter_2d_centres(synthetic_nuscenes):  # noqa: F811
    # The info converter projected every visible box centre with the devkit, from the global frame at
    # each camera's own time: an independent path to the same pixels.
    sample = val_dataset(synthetic_nuscenes).samples[0]
    projections = sample_lidar2img(sample)
    checked = 0
    for camera in range(len(CAMERA_NAMES)):
        uv, depth = project_points(sample.gt_boxes[:, :3], projections[camera])
        for centre, centre_depth in zip(sample.centers2d[camera], sample.depths[camera]):
            distance = np.linalg.norm(np.nan_to_num(uv - centre, nan=1e9), axis=1)
            assert distance.min() < 1e-3
            assert depth[distance.argmin()] == pytest.approx(centre_depth, abs=1e-4)
            checked += 1
    assert checked > 0


def test_visualize_says_what_is_missing(run_dir, synthetic_nuscenes):  # noqa: F811
    with pytest.raises(VisualizationError, match="no predictions"):
        visualize_command(run_dir, host=create_plugin_host())
    token = val_dataset(synthetic_nuscenes).samples[0].token
    empty = {"boxes_3d": np.zeros((0, 9)), "scores_3d": [], "labels_3d": []}
    save_predictions({token: empty}, predictions_path(run_dir, 1))
    with pytest.raises(VisualizationError, match="not in the val set"):
        visualize_command(run_dir, sample="no-such-token", host=create_plugin_host())
    second = val_dataset(synthetic_nuscenes).samples[1].token
    with pytest.raises(VisualizationError, match=f"no predictions for sample '{second}'"):
        visualize_command(run_dir, sample=second, host=create_plugin_host())
    with pytest.raises(VisualizationError, match="no resolved recipe"):
        visualize_command(run_dir / "elsewhere", host=create_plugin_host())
    # a sample without detections still renders
    assert visualize_command(run_dir, host=create_plugin_host()).is_file()
