"""The synthetic nuScenes generator: devkit compatibility, lidar points, rendering, determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import synthetic_nuscenes  # noqa: F401  (session fixture)
from PIL import Image

from streampetr_plugin.data.synthetic import (
    CLASS_COLOURS,
    MINI_TRAIN_SCENES,
    MINI_VAL_SCENES,
    make_synthetic,
)

TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")


@pytest.fixture(scope="module")
def nusc(synthetic_nuscenes):  # noqa: F811
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=synthetic_nuscenes.version, dataroot=str(synthetic_nuscenes.root), verbose=False)


def test_mini_split_names_match_devkit():
    from nuscenes.utils import splits

    assert list(MINI_TRAIN_SCENES) == splits.mini_train
    assert list(MINI_VAL_SCENES) == splits.mini_val


def test_devkit_loads_every_table_and_split(synthetic_nuscenes, nusc):  # noqa: F811
    from nuscenes.utils.splits import create_splits_scenes

    for table in TABLES:
        assert len(getattr(nusc, table)) > 0, table
    scene_names = {scene["name"] for scene in nusc.scene}
    splits = create_splits_scenes()
    generated = synthetic_nuscenes.dataset
    assert scene_names == set(generated.train_scenes) | set(generated.val_scenes)
    assert set(synthetic_nuscenes.dataset.train_scenes) <= set(splits["mini_train"])
    assert set(synthetic_nuscenes.dataset.val_scenes) <= set(splits["mini_val"])
    for sample in nusc.sample:
        assert set(sample["data"]) == {"CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK",
                                       "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "LIDAR_TOP"}
    instance_tokens = {annotation["instance_token"] for annotation in nusc.sample_annotation}
    category_tokens = {nusc.get("instance", token)["category_token"] for token in instance_tokens}
    detection_names = {nusc.get("category", category_token)["name"] for category_token in category_tokens}
    assert len(detection_names) == 10  # every detection class occurs


def test_lidar_points_lie_on_annotated_objects(nusc):
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import points_in_box

    for sample in nusc.sample[:4]:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        points = LidarPointCloud.from_file(path).points[:3]  # (3, N) LiDAR frame
        assert boxes
        for box, token in zip(boxes, sample["anns"]):
            annotation = nusc.get("sample_annotation", token)
            assert annotation["num_lidar_pts"] > 0
            assert int(points_in_box(box, points).sum()) == annotation["num_lidar_pts"]


def test_devkit_velocity_matches_straight_line_motion(nusc):
    speeds = []
    for annotation in nusc.sample_annotation:
        if annotation["prev"] and annotation["next"]:
            velocity = nusc.box_velocity(annotation["token"])
            previous = nusc.box_velocity(annotation["prev"])
            np.testing.assert_allclose(velocity, previous, atol=0.05)  # constant velocity
            speeds.append(np.linalg.norm(velocity[:2]))
    assert max(speeds) > 1.0 and min(speeds) < 1e-6  # both moving and parked objects


def test_image_shows_nearest_object_in_its_class_colour(synthetic_nuscenes, nusc):  # noqa: F811
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.geometry_utils import BoxVisibility

    checked = 0
    for sample in nusc.sample:
        for channel in ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT",
                        "CAM_BACK_RIGHT"):
            path, boxes, intrinsic = nusc.get_sample_data(sample["data"][channel],
                                                          box_vis_level=BoxVisibility.NONE)
            # Objects are painted far to near by centre distance: the nearest one is never occluded.
            nearest = min(boxes, key=lambda box: np.linalg.norm(box.center))
            if nearest.center[2] < 0.5:
                continue
            name = category_to_detection_name(nearest.name)
            u, v, w = intrinsic @ nearest.center
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
            column, row = int(u / w), int(v / w)
            if name == "barrier" or not (2 <= column < image.shape[1] - 2 and 2 <= row < image.shape[0] - 2):
                continue
            pixel = image[row - 1:row + 2, column - 1:column + 2].reshape(-1, 3).mean(axis=0)
            colour = np.array(CLASS_COLOURS[name], dtype=np.float64)
            # Faces are the class colour times a shade: compare directions (JPEG noise tolerated).
            cosine = pixel @ colour / (np.linalg.norm(pixel) * np.linalg.norm(colour))
            assert cosine > 0.97, (name, pixel, colour)
            checked += 1
    assert checked >= 5


def test_generation_is_deterministic_for_a_seed(tmp_path):
    kwargs = dict(num_scenes=2, samples_per_scene=2, objects_per_scene=12, image_size=(64, 36))
    make_synthetic(tmp_path / "a", seed=3, **kwargs)
    make_synthetic(tmp_path / "b", seed=3, **kwargs)
    make_synthetic(tmp_path / "c", seed=4, **kwargs)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    annotations_a = json.loads((tmp_path / "a" / "v1.0-mini" / "sample_annotation.json").read_text())
    annotations_c = json.loads((tmp_path / "c" / "v1.0-mini" / "sample_annotation.json").read_text())
    assert [a["translation"] for a in annotations_a] != [a["translation"] for a in annotations_c]


def test_intrinsics_match_the_image_size(nusc):
    for record in nusc.sample_data:
        if record["fileformat"] != "jpg":
            continue
        calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
        intrinsic = np.array(calibration["camera_intrinsic"])
        with Image.open(nusc.get_sample_data_path(record["token"])) as image:
            assert image.size == (record["width"], record["height"])
        # Principal point near the centre, as in nuScenes (cx ~ 0.51 W, cy ~ 0.54 H).
        assert 0.45 < intrinsic[0, 2] / record["width"] < 0.55
        assert 0.45 < intrinsic[1, 2] / record["height"] < 0.6


def _instance_classes(root, version):
    categories = {c["token"]: c["name"] for c in json.loads((root / version / "category.json").read_text())}
    instances = json.loads((root / version / "instance.json").read_text())
    return [categories[instance["category_token"]] for instance in instances]


def test_uniform_classes_draws_every_class_equally_often(tmp_path):
    kwargs = dict(num_scenes=2, samples_per_scene=2, objects_per_scene=60, image_size=(64, 36), seed=1,
                  annotation_range=200.0)
    make_synthetic(tmp_path / "freq", **kwargs)
    make_synthetic(tmp_path / "uniform", uniform_classes=True, **kwargs)
    frequent = _instance_classes(tmp_path / "freq", "v1.0-mini")
    uniform = _instance_classes(tmp_path / "uniform", "v1.0-mini")
    # nuScenes-like: cars (weight 0.30) outnumber trailers (0.03) several times over.
    assert frequent.count("vehicle.car") > 3 * frequent.count("vehicle.trailer")
    # Uniform: 10 of 120 forced (one per class per scene), 110 drawn with p = 0.1 each: 13 expected per class.
    counts = [uniform.count(name) for name in sorted(set(uniform))]
    assert len(counts) == 10 and min(counts) >= 5 and max(counts) <= 24, counts


def test_more_than_ten_scenes_take_trainval_scene_names(tmp_path):
    from nuscenes.utils import splits

    from streampetr_plugin.data.synthetic import synthetic_version

    assert synthetic_version(10) == "v1.0-mini" and synthetic_version(11) == "v1.0-trainval"
    dataset = make_synthetic(tmp_path / "d", num_scenes=11, samples_per_scene=2, objects_per_scene=2,
                             image_size=(32, 18), version=synthetic_version(11))
    assert len(dataset.train_scenes) == 9 and len(dataset.val_scenes) == 2
    assert set(dataset.train_scenes) <= set(splits.train) and set(dataset.val_scenes) <= set(splits.val)


def test_extra_training_scenes_leave_the_other_scenes_as_they_were(tmp_path):
    kwargs = {"num_scenes": 3, "samples_per_scene": 2, "objects_per_scene": 4, "image_size": (64, 36)}
    base_dir, grown_dir = tmp_path / "base", tmp_path / "grown"
    base = make_synthetic(base_dir, seed=2, **kwargs)
    grown = make_synthetic(grown_dir, seed=2, extra_train_scenes=2, **kwargs)
    assert grown.val_scenes == base.val_scenes
    assert grown.train_scenes[:len(base.train_scenes)] == base.train_scenes and len(grown.train_scenes) == 4
    for relative in sorted(p.relative_to(base_dir) for p in base_dir.rglob("*") if p.is_file()):
        old, new = base_dir / relative, grown_dir / relative
        if relative.name == "map.json":  # one row per map, listing the logs recorded on it
            logs = {row["token"]: set(row["log_tokens"]) for row in json.loads(new.read_text())}
            assert all(set(row["log_tokens"]) <= logs[row["token"]] for row in json.loads(old.read_text()))
        elif relative.suffix == ".json":  # a table: the grown one holds every row of the other
            rows = {json.dumps(row, sort_keys=True) for row in json.loads(new.read_text())}
            old_rows = json.loads(old.read_text())
            assert all(json.dumps(row, sort_keys=True) in rows for row in old_rows), relative
        else:  # images, point clouds and maps of the first scenes: byte for byte
            assert new.read_bytes() == old.read_bytes(), relative
    scenes = json.loads((grown_dir / "v1.0-mini" / "scene.json").read_text())
    assert len(scenes) == 5 and len({scene["first_sample_token"] for scene in scenes}) == 5
