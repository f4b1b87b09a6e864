"""``streampetr export``: a trained checkpoint as an ONNX graph of one streaming frame.

Usage: ``streampetr export RECIPE --checkpoint PATH --out DIR [a.b=v ...] [--opset N] [--parity-frames N]``.

Writes ``DIR/streampetr.onnx`` (:mod:`streampetr_plugin.deploy.graph`: one frame of one stream at the
recipe's test shapes, the memory as inputs and outputs) and ``DIR/export.json``: the recipe's name and
hash, the opset, every input and output with its shape and dtype, and the parity figures measured right
after export (:mod:`streampetr_plugin.deploy.parity`) on the first frames of the recipe's val split in
stream order, or on synthetic frames of the recipe's shapes when that split cannot be loaded.

The graph is traced from the detector's own modules with ``torch.onnx.export`` (the dynamo exporter,
whose optimiser folds constants), checked with ``onnx.checker`` and refused if any tensor in it is
float64 (TensorRT and Ascend ATC reject float64).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.deploy.options import DEFAULT_OPSET, DEFAULT_PARITY_FRAMES, MIN_OPSET
from streampetr_plugin.deploy.graph import (
    GraphSignature,
    StreamingFrameGraph,
    example_inputs,
    graph_signature,
)
from streampetr_plugin.deploy.onnx_runner import ONNX_FILE, OnnxStreamRunner, import_deploy_module
from streampetr_plugin.deploy.parity import ParityReport, measure_parity
from streampetr_plugin.errors import InputError, RunError, describe
from streampetr_plugin.models.detector import StreamPETRDetector
from streampetr_plugin.plugins import PluginHost, Registries

logger = logging.getLogger(__name__)

EXPORT_JSON = "export.json"
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


class ExportError(RunError):
    """The graph could not be exported or failed its checks."""


@dataclass
class ExportResult:
    """What :func:`export_command` wrote and measured."""

    onnx_path: Path
    json_path: Path
    signature: GraphSignature
    parity: Optional[ParityReport]


def load_detector(
    recipe: Recipe, host: PluginHost, checkpoint: Optional[Path], *, inference_adapters: bool = True,
    exporting: bool = False,
) -> StreamPETRDetector:
    """The recipe's detector (components of ``host``) in eval mode with ``checkpoint``'s weights (ours or a
    reference ``.pth``; None keeps the initialisation), on the CPU, after the recipe's CPU adapters of the
    model and inference phases (channels-last, BatchNorm folding, ...) unless ``inference_adapters`` is
    False; ``exporting``: the detector will be traced (adapters that replace the eager forward skip)."""
    from streampetr_plugin.adapters.base import AdapterContext, AdapterRunner, Phase
    from streampetr_plugin.interop.checkpoint import load_reference_checkpoint
    from streampetr_plugin.models.build import build_model

    model = build_model(recipe, host.registries)
    host.hooks.post_model_build(model=model, recipe=recipe)
    if not isinstance(model, StreamPETRDetector):
        raise InputError(
            describe(
                "model.type",
                f"{type(model).__name__} is not a StreamPETR detector",
                "export and infer take StreamPETR recipes",
            )
        )
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise InputError(describe(str(checkpoint), "no such checkpoint", "pass a file from checkpoints/"))
        report = load_reference_checkpoint(model, checkpoint)
        if report.missing or report.shape_mismatch:
            raise InputError(
                describe(
                    str(checkpoint),
                    f"does not fit the recipe's model: {report.summary()}",
                    "pass the recipe it was trained with",
                )
            )
    if inference_adapters:
        # As `streampetr eval` builds its model: the model-phase adapters (layout, ...) on the built
        # detector, then, in eval mode with its weights, the inference-phase ones (BatchNorm folding, ...).
        adapters = AdapterRunner.from_recipe(recipe, "cpu", host.registries)
        context = AdapterContext(device="cpu", recipe=recipe, model=model, exporting=exporting)
        adapters.run(Phase.MODEL, context)
        model.eval()
        adapters.run(Phase.INFERENCE, context)
        logger.info("%s", adapters.summary_table("CPU adapters:"))
    model.eval()
    return model


def recipe_test_shape(recipe: Recipe) -> Tuple[int, Tuple[int, int]]:
    """(cameras, padded (H, W)) of the recipe's test-time input: the nuScenes rig's six cameras at the
    val pipeline's ``final_dim`` padded to its ``size_divisor``."""
    from streampetr_plugin.bench.synthetic_batch import NUM_CAMERAS, stream_shape

    return NUM_CAMERAS, stream_shape(recipe, training=False).image_hw


def float64_tensors(model: Any) -> List[str]:
    """Where ``model`` (an ``onnx.ModelProto``) holds or produces float64: inputs, outputs, value infos
    (after shape inference), initializers, ``Cast`` targets and tensor-valued attributes."""
    onnx = import_deploy_module("onnx")
    double = onnx.TensorProto.DOUBLE
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    found = [
        f"value {value.name}"
        for value in (*graph.input, *graph.output, *graph.value_info)
        if value.type.tensor_type.elem_type == double
    ]
    found += [f"initializer {tensor.name}" for tensor in graph.initializer if tensor.data_type == double]
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == double:
                found.append(f"Cast node {node.name}")
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == double:
                found.append(f"attribute {attribute.name} of {node.op_type} node {node.name}")
    return found


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's optimiser logs every rewrite it considers (thousands of lines): errors only."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)


def export_graph(
    detector: StreamPETRDetector,
    path: Path,
    *,
    num_cameras: int,
    image_hw: Tuple[int, int],
    opset: int = DEFAULT_OPSET,
) -> GraphSignature:
    """Trace ``detector`` (eval mode) into the ONNX file ``path``, check it, and return its signature."""
    onnx = import_deploy_module("onnx")
    import_deploy_module("onnxscript")  # what torch.onnx's exporter translates with
    if opset < MIN_OPSET:
        raise InputError(describe("--opset", f"{opset} is below {MIN_OPSET}", f"use {MIN_OPSET} or later"))
    signature = graph_signature(detector, num_cameras=num_cameras, image_hw=image_hw)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter_logs():
        torch.onnx.export(
            StreamingFrameGraph(detector).eval(),
            tuple(example_inputs(signature)),
            str(path),
            input_names=[spec.name for spec in signature.inputs],
            output_names=[spec.name for spec in signature.outputs],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    doubles = float64_tensors(model)
    if doubles:
        raise ExportError(
            describe(
                str(path),
                f"the graph holds float64 tensors: {doubles[:5]}",
                "keep the exported path in float32",
            )
        )
    return signature


def recipe_hash(recipe: Recipe) -> str:
    """SHA-256 of the resolved recipe (its YAML dump), the same for equal recipes."""
    from streampetr_plugin.config.loader import dump_recipe

    return hashlib.sha256(dump_recipe(recipe).encode("utf-8")).hexdigest()


def _parity_batches(
    recipe: Recipe, registries: Registries, count: int
) -> Tuple[str, Iterable[Mapping[str, Any]]]:
    """(where the frames come from, the first ``count`` one-stream batches of the val split in stream
    order); synthetic frames of the recipe's shapes when the split cannot be loaded."""
    from streampetr_plugin.deploy.streams import stream_batches

    try:
        return "val split", list(islice(stream_batches(recipe, registries, split="val"), count))
    except (OSError, ValueError) as error:
        logger.warning("parity on synthetic frames: the val split did not load (%s)", error)
    from streampetr_plugin.bench.synthetic_batch import SyntheticStreams, stream_shape

    streams = SyntheticStreams(
        dataclasses.replace(stream_shape(recipe, training=False), batch_size=1), with_targets=False
    )
    return "synthetic frames", [streams.frame(index, torch.device("cpu")) for index in range(count)]


def export_command(
    recipe: Recipe,
    *,
    host: PluginHost,
    checkpoint: Optional[Path],
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    parity_frames: int = DEFAULT_PARITY_FRAMES,
) -> ExportResult:
    """Export ``recipe``'s detector with ``checkpoint``'s weights to ``out_dir`` (module docstring)."""
    detector = load_detector(recipe, host, checkpoint, exporting=True)
    num_cameras, image_hw = recipe_test_shape(recipe)
    onnx_path = Path(out_dir) / ONNX_FILE
    logger.info("exporting %s at %d cameras x %dx%d to %s", recipe.name, num_cameras, *image_hw, onnx_path)
    signature = export_graph(detector, onnx_path, num_cameras=num_cameras, image_hw=image_hw, opset=opset)
    parity, parity_source = None, None
    if parity_frames > 0:
        parity_source, batches = _parity_batches(recipe, host.registries, parity_frames)
        runner = OnnxStreamRunner(onnx_path, threads=torch.get_num_threads(), nms_radius=recipe_nms_radius(recipe))
        parity = measure_parity(detector, runner, batches)
    summary = export_summary(
        recipe=recipe,
        checkpoint=checkpoint,
        onnx_path=onnx_path,
        signature=signature,
        parity=parity,
        parity_source=parity_source,
    )
    json_path = Path(out_dir) / EXPORT_JSON
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return ExportResult(onnx_path=onnx_path, json_path=json_path, signature=signature, parity=parity)


def recipe_nms_radius(recipe: Recipe) -> Optional[float]:
    """The decoder's class-wise duplicate suppression radius (``model.head.nms_radius``, a field of the head's
    params), None if unset or the head has no such option."""
    return getattr(recipe.model.head.params, "nms_radius", None)


def export_summary(
    *,
    recipe: Recipe,
    checkpoint: Optional[Path],
    onnx_path: Path,
    signature: GraphSignature,
    parity: Optional[ParityReport],
    parity_source: Optional[str],
) -> Dict[str, Any]:
    """The content of ``export.json`` (the opset is the one the exporter wrote, which may be above the
    one asked for)."""
    onnx = import_deploy_module("onnx")
    opsets = onnx.load(str(onnx_path)).opset_import
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "python": platform.python_version()}
    if parity is not None:
        versions["onnxruntime"] = import_deploy_module("onnxruntime").__version__
    return {
        "recipe": recipe.name,
        "recipe_sha256": recipe_hash(recipe),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "onnx_file": onnx_path.name,
        "opset": max(entry.version for entry in opsets if entry.domain in ("", "ai.onnx")),
        "inputs": [spec.to_dict() for spec in signature.inputs],
        "outputs": [spec.to_dict() for spec in signature.outputs],
        # The decoder's duplicate suppression is not in the graph; a runner applies it to the kept pairs.
        "nms_radius": recipe_nms_radius(recipe),
        "parity": None if parity is None else {"frames_from": parity_source, **parity.to_dict()},
        "versions": versions,
    }
