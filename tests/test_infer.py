"""``streampetr infer``: nuScenes results the devkit loads, the same from both backends, and its command line
(the model: ``tests/deploy_helpers.py``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from nuscenes.eval.common.loaders import load_prediction
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.eval.tracking.data_classes import TrackingBox

from streampetr_plugin.cli.main import build_parser
from streampetr_plugin.config.loader import dump_recipe
from streampetr_plugin.cli.deploy import run_export, run_infer
from streampetr_plugin.deploy.infer import infer_command
from streampetr_plugin.deploy.streams import split_dataset
from streampetr_plugin.deploy.onnx_runner import OnnxStreamRunner
from streampetr_plugin.errors import InputError
from streampetr_plugin.tracking.query_propagation import MissingQueryIdsError
from streampetr_plugin.host import create_plugin_host
from tests import deploy_helpers

VAL_SAMPLES = 4  # the tests' synthetic nuScenes: one val scene of four key frames


@pytest.fixture(scope="module")
def exported(synthetic_nuscenes, tmp_path_factory):
    return deploy_helpers.exported_demo(synthetic_nuscenes, tmp_path_factory)


@pytest.fixture(scope="module")
def torch_results(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer_torch")
    return infer_command(
        exported.recipe, checkpoint=exported.checkpoint, backend="torch", out_dir=out, pictures=1, host=HOST
    )


HOST = create_plugin_host()


def test_results_file_is_what_the_devkit_loads_for_every_val_sample(exported, torch_results):
    boxes, meta = load_prediction(str(torch_results.results_path), 500, DetectionBox)
    val_tokens = {sample.token for sample in split_dataset(exported.recipe, HOST.registries, "val").samples}
    assert set(boxes.sample_tokens) == val_tokens and len(val_tokens) == VAL_SAMPLES
    assert meta["use_camera"] and not meta["use_lidar"]
    assert sum(len(boxes[token]) for token in val_tokens) > 0
    assert all(
        box.detection_name in exported.recipe.data.class_names for token in val_tokens for box in boxes[token]
    )
    assert torch_results.frames == VAL_SAMPLES
    assert torch_results.predictions_path.is_file()
    assert [path.suffix for path in torch_results.pictures] == [".png"] and torch_results.pictures[
        0
    ].is_file()


def _records(path, threshold: float = 0.3):
    results = json.loads(path.read_text())["results"]
    return {
        token: [record for record in records if record["detection_score"] >= threshold]
        for token, records in results.items()
    }


def test_onnxruntime_backend_writes_the_torch_backend_results(exported, torch_results, tmp_path):
    graph_results = infer_command(
        exported.recipe, backend="onnxruntime", onnx_dir=exported.out_dir, out_dir=tmp_path, host=HOST
    )
    expected, got = _records(torch_results.results_path), _records(graph_results.results_path)
    assert set(got) == set(expected)
    compared = 0
    for token, records in expected.items():
        assert sorted(r["detection_name"] for r in got[token]) == sorted(r["detection_name"] for r in records)
        for record in records:
            twins = [r for r in got[token] if r["detection_name"] == record["detection_name"]]
            distances = [np.linalg.norm(np.subtract(r["translation"], record["translation"])) for r in twins]
            twin = twins[int(np.argmin(distances))]
            assert min(distances) < 0.01 and abs(twin["detection_score"] - record["detection_score"]) < 1e-4
            compared += 1
    assert compared >= 10


def test_tracking_results_from_the_torch_backend_and_the_graph_needs_centerpoint(exported, tmp_path):
    from nuscenes.eval.common.config import config_factory

    config_factory("tracking_nips_2019")  # the devkit learns its tracking class names from the configuration
    tracked = infer_command(exported.recipe, checkpoint=exported.checkpoint, backend="torch",
                            out_dir=tmp_path / "torch", tasks=("tracking",), host=HOST)
    assert tracked.results_path is None and not (tmp_path / "torch" / "results_nusc.json").exists()
    boxes, _ = load_prediction(str(tracked.tracking_results_path), 500, TrackingBox)
    assert set(boxes.sample_tokens) == {
        sample.token for sample in split_dataset(exported.recipe, HOST.registries, "val").samples
    }
    # the exported graph gives no query ids: the default tracker says which one works without them
    with pytest.raises(MissingQueryIdsError, match="centerpoint"):
        infer_command(exported.recipe, backend="onnxruntime", onnx_dir=exported.out_dir,
                      out_dir=tmp_path / "graph", tasks=("tracking",), host=HOST)


def test_command_line_wires_both_commands_and_reports_missing_inputs(exported, tmp_path):
    parser = build_parser()
    export_args = parser.parse_args(["export", "demo_cpu", "--checkpoint", "a.pth", "--out", str(tmp_path)])
    assert export_args.handler is run_export and export_args.opset >= 17
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(exported.recipe))
    args = parser.parse_args(["infer", str(recipe_file), "--backend", "onnxruntime"])
    assert args.handler is run_infer
    with pytest.raises(InputError, match="--onnx"):
        args.handler(args, HOST)
    with pytest.raises(InputError, match="streampetr export"):
        OnnxStreamRunner(tmp_path)
