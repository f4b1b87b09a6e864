"""``streampetr export``: the graph's contract (names, shapes, dtypes, no float64) and its agreement with the
PyTorch eval path over a stream that restarts, in onnxruntime (the model: ``tests/deploy_helpers.py``)."""
from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from streampetr_plugin.deploy.export import float64_tensors, load_detector
from streampetr_plugin.deploy.graph import (
    FRAME_INPUTS,
    MEMORY_OUTPUTS,
    StreamClock,
    StreamingFrameGraph,
    frame_inputs,
    kept_detections,
)
from streampetr_plugin.deploy.streams import stream_batches
from streampetr_plugin.deploy.onnx_runner import OnnxStreamRunner
from streampetr_plugin.models.layers.memory import MEMORY_FIELDS
from streampetr_plugin import load_recipe
from streampetr_plugin.host import create_plugin_host
from tests import deploy_helpers, trainer_helpers

MEMORY_SHAPES = {
    "embedding": (64,),
    "reference_point": (3,),
    "timestamp": (1,),
    "egopose": (4, 4),
    "velo": (2,),
}
MEMORY_ROWS = 128  # the demo recipe's memory_len
NUM_QUERIES = 96 + 32  # learnable + propagated
TOP_K = 100  # the demo recipe's max_num
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def exported(synthetic_nuscenes, tmp_path_factory):
    return deploy_helpers.exported_demo(synthetic_nuscenes, tmp_path_factory)


@pytest.fixture(scope="module")
def graph(exported):
    return onnx.load(str(exported.result.onnx_path))


HOST = create_plugin_host()


def _declared(values) -> dict:
    return {
        value.name: (
            tuple(dim.dim_value for dim in value.type.tensor_type.shape.dim),
            value.type.tensor_type.elem_type,
        )
        for value in values
    }


def test_graph_passes_the_checker_at_opset_17_or_later_with_the_named_inputs_and_outputs(graph):
    onnx.checker.check_model(graph, full_check=True)
    assert max(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    float32, int64 = TensorProto.FLOAT, TensorProto.INT64
    memory = {
        f"{prefix}.{field}": ((1, MEMORY_ROWS, *MEMORY_SHAPES[field]), float32)
        for prefix in ("memory", "memory_next")
        for field in MEMORY_FIELDS
    }
    cameras = 6
    assert _declared(graph.graph.input) == {
        "img": ((1, cameras, 3, 64, 160), float32),
        "lidar2img": ((1, cameras, 4, 4), float32),
        "intrinsics": ((1, cameras, 4, 4), float32),
        "extrinsics": ((1, cameras, 4, 4), float32),
        "ego_pose": ((1, 4, 4), float32),
        "ego_pose_inv": ((1, 4, 4), float32),
        "time_delta": ((1,), float32),
        "prev_exists": ((1,), float32),
        **{name: spec for name, spec in memory.items() if name.startswith("memory.")},
    }
    assert [value.name for value in graph.graph.input][:8] == list(FRAME_INPUTS)
    assert _declared(graph.graph.output) == {
        "boxes_3d": ((1, TOP_K, 9), float32),
        "scores_3d": ((1, TOP_K), float32),
        "labels_3d": ((1, TOP_K), int64),
        "cls_logits": ((1, NUM_QUERIES, 10), float32),
        "bbox_preds": ((1, NUM_QUERIES, 10), float32),
        **{name: spec for name, spec in memory.items() if name.startswith("memory_next.")},
    }


def test_no_tensor_in_the_graph_is_float64(graph):
    inferred = onnx.shape_inference.infer_shapes(graph).graph
    elem_types = [
        value.type.tensor_type.elem_type
        for value in (*inferred.input, *inferred.output, *inferred.value_info)
    ]
    elem_types += [tensor.data_type for tensor in inferred.initializer]
    for node in inferred.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to":
                elem_types.append(attribute.i)
            if attribute.type == onnx.AttributeProto.TENSOR:
                elem_types.append(attribute.t.data_type)
    assert len(inferred.value_info) > 100  # shape inference reached the inside of the graph
    assert TensorProto.DOUBLE not in elem_types
    assert set(elem_types) <= {TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL}


def test_float64_check_finds_a_cast_and_an_initializer():
    cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE, name="to_double")
    add = helper.make_node("Add", ["y", "offset"], ["z"], name="add")
    offset = helper.make_tensor("offset", TensorProto.DOUBLE, [1], [1.0])
    model = helper.make_model(
        helper.make_graph(
            [cast, add],
            "doubles",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("z", TensorProto.DOUBLE, [1])],
            initializer=[offset],
        )
    )
    found = float64_tensors(model)
    assert "Cast node to_double" in found and "initializer offset" in found and "value z" in found


def test_export_json_describes_the_graph_and_the_measured_parity(exported, graph):
    summary = json.loads(exported.result.json_path.read_text())
    assert summary["recipe"] == exported.recipe.name and len(summary["recipe_sha256"]) == 64
    assert summary["opset"] >= 17
    declared = {**_declared(graph.graph.input), **_declared(graph.graph.output)}
    described = summary["inputs"] + summary["outputs"]
    assert [spec["name"] for spec in described] == list(declared)
    numpy_names = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64"}
    for spec in described:
        assert (tuple(spec["shape"]), spec["dtype"]) == (
            declared[spec["name"]][0],
            numpy_names[declared[spec["name"]][1]],
        )
    parity = summary["parity"]
    assert parity["frames"] == deploy_helpers.PARITY_FRAMES and parity["frames_from"] == "val split"
    assert parity["onnxruntime_teacher_forced"]["max_logit_error"] < 1e-4


def _gravity_centres(boxes: np.ndarray) -> np.ndarray:
    centres = boxes[:, :3].astype(np.float64)
    centres[:, 2] += boxes[:, 5] / 2
    return centres


def _assert_same_detections(eager: dict, graph: dict) -> int:
    """Detections >= THRESHOLD: same classes as often, each eager one with a twin of its class within 1 cm
    (gravity centres) and 1e-4 in score; returns how many were compared."""
    chosen, other = eager["scores_3d"] >= THRESHOLD, graph["scores_3d"] >= THRESHOLD
    assert Counter(eager["labels_3d"][chosen].tolist()) == Counter(graph["labels_3d"][other].tolist())
    centres, other_centres = (
        _gravity_centres(eager["boxes_3d"][chosen]),
        _gravity_centres(graph["boxes_3d"][other]),
    )
    for centre, label, score in zip(centres, eager["labels_3d"][chosen], eager["scores_3d"][chosen]):
        same_class = np.flatnonzero(graph["labels_3d"][other] == label)
        distances = np.linalg.norm(other_centres[same_class] - centre, axis=-1)
        twin = same_class[np.argmin(distances)]
        assert distances.min() < 0.01
        assert abs(graph["scores_3d"][other][twin] - score) < 1e-4
    return int(chosen.sum())


@torch.no_grad()
def test_onnxruntime_follows_the_pytorch_eval_path_over_a_stream_that_restarts(exported):
    detector = load_detector(exported.recipe, HOST, exported.checkpoint)
    # the runner suppresses the duplicates the eval decoder suppresses (the recipe's nms_radius)
    nms_radius = detector.pts_bbox_head.bbox_coder.nms_radius
    carried = OnnxStreamRunner(exported.out_dir, threads=1, nms_radius=nms_radius)
    forced = OnnxStreamRunner(exported.out_dir, threads=1)
    # two scenes of four frames
    batches = list(stream_batches(exported.recipe, HOST.registries, split="train"))
    scenes = [batch["scene_token"][0] for batch in batches]
    assert len(batches) == 8 and scenes[3] != scenes[4]
    compared, previous_time = 0, 0.0
    clock = StreamClock()
    for index, batch in enumerate(batches):
        eager_memory = detector.stream_state.memory.save()
        eager = detector.infer(batch)
        eager_detections = {name: value.numpy() for name, value in eager.detections[0].items()}
        result = carried.step(batch)
        compared += _assert_same_detections(eager_detections, result.detections)

        # Teacher forcing: the graph on the eager memory, ages counted from the previous frame.
        prev_exists, time_delta = clock.advance(
            scene_token=scenes[index], timestamp=float(batch["timestamp"][0])
        )
        memory = forced.zero_memory()
        if prev_exists:
            ages = eager_memory["timestamp"] + previous_time  # minus the writing time, plus the last frame's
            state = {**eager_memory, "timestamp": ages}
            memory = {
                f"memory.{field}": state[field][:, :MEMORY_ROWS].float().numpy() for field in MEMORY_FIELDS
            }
        outputs = forced.evaluate(frame_inputs(batch, time_delta=time_delta, prev_exists=prev_exists), memory)
        np.testing.assert_allclose(
            outputs["cls_logits"][0], eager.all_cls_scores[-1][0].numpy(), atol=1e-4, rtol=0
        )
        np.testing.assert_allclose(
            outputs["bbox_preds"][0], eager.all_bbox_preds[-1][0].numpy(), atol=1e-3, rtol=0
        )
        previous_time = float(batch["timestamp"][0])
        if index == 4:  # the new scene: the carried stream restarted, as a fresh runner would
            fresh = OnnxStreamRunner(exported.out_dir, threads=1).step(batch)
            for name in result.outputs:
                np.testing.assert_array_equal(result.outputs[name], fresh.outputs[name])
    assert compared >= 40  # the detections compared are many, over all eight frames


@torch.no_grad()
def test_graph_marks_the_pairs_the_eval_decoder_drops(exported):
    detector = load_detector(exported.recipe, HOST, exported.checkpoint)
    detector.pts_bbox_head.bbox_coder.post_center_range = [-8.0, -8.0, -10.0, 8.0, 8.0, 10.0]
    batch = next(islice(stream_batches(exported.recipe, HOST.registries, split="val"), 1))
    frame = frame_inputs(batch, time_delta=0.0, prev_exists=False)
    memory = [torch.zeros(1, MEMORY_ROWS, *MEMORY_SHAPES[field]) for field in MEMORY_FIELDS]
    values = StreamingFrameGraph(detector)(*[torch.from_numpy(frame[name]) for name in FRAME_INPUTS], *memory)
    names = ["boxes_3d", "scores_3d", "labels_3d", "cls_logits", "bbox_preds"] + list(MEMORY_OUTPUTS)
    nms_radius = detector.pts_bbox_head.bbox_coder.nms_radius  # the runner's suppression, as the decoder's
    graph = kept_detections(
        {name: value.numpy() for name, value in zip(names, values)}, nms_radius=nms_radius
    )
    eager = detector.infer(batch).detections[0]
    assert 0 < len(graph["scores_3d"]) < TOP_K  # some pairs were dropped, some kept
    for name in ("boxes_3d", "scores_3d", "labels_3d"):
        np.testing.assert_allclose(graph[name], eager[name].numpy(), atol=1e-5, rtol=0)


@torch.no_grad()
def test_runner_suppresses_duplicates_as_the_eval_decoder_does(exported):
    detector = load_detector(exported.recipe, HOST, exported.checkpoint)
    detector.pts_bbox_head.bbox_coder.nms_radius = 3.0
    batch = next(islice(stream_batches(exported.recipe, HOST.registries, split="val"), 1))
    frame = frame_inputs(batch, time_delta=0.0, prev_exists=False)
    memory = [torch.zeros(1, MEMORY_ROWS, *MEMORY_SHAPES[field]) for field in MEMORY_FIELDS]
    values = StreamingFrameGraph(detector)(*[torch.from_numpy(frame[name]) for name in FRAME_INPUTS], *memory)
    names = ["boxes_3d", "scores_3d", "labels_3d", "cls_logits", "bbox_preds"] + list(MEMORY_OUTPUTS)
    outputs = {name: value.numpy() for name, value in zip(names, values)}
    graph = kept_detections(outputs, nms_radius=3.0)
    assert len(graph["scores_3d"]) < len(kept_detections(outputs)["scores_3d"])  # some were duplicates
    for label in np.unique(graph["labels_3d"]):  # no two kept boxes of a class within the radius
        centres = graph["boxes_3d"][graph["labels_3d"] == label, :2]
        distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        assert (distances[~np.eye(len(centres), dtype=bool)] > 3.0).all()
    eager = detector.infer(batch).detections[0]
    for name in ("boxes_3d", "scores_3d", "labels_3d"):
        np.testing.assert_allclose(graph[name], eager[name].numpy(), atol=1e-5, rtol=0)


def test_detector_for_export_takes_the_model_layout_but_is_never_compiled(synthetic_nuscenes):
    # The demo recipe turns cpu_channels_last on; graph_capture would replace the eager forward.
    overrides = trainer_helpers.demo_overrides(synthetic_nuscenes.root, synthetic_nuscenes.version)
    recipe = load_recipe(trainer_helpers.DEMO_RECIPE, overrides + [
        "accelerator.adapters.graph_capture.enabled=true", "accelerator.adapters.graph_capture.backend=aot_eager",
    ])
    for exporting in (True, False):
        detector = load_detector(recipe, HOST, None, exporting=exporting)
        assert not detector.training
        stem = next(module for module in detector.img_backbone.modules() if isinstance(module, torch.nn.Conv2d))
        assert stem.weight.is_contiguous(memory_format=torch.channels_last)
        compiled = detector.img_backbone._compiled_call_impl is not None
        assert compiled is not exporting
