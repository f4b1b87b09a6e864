"""The ``streampetr export`` and ``streampetr infer`` command lines (light to import: the work happens in
:mod:`streampetr_plugin.deploy.export` and :mod:`streampetr_plugin.deploy.infer`, imported when a command
runs). :func:`add_export_arguments` / :func:`add_infer_arguments` each set ``handler``."""
from __future__ import annotations

import argparse
from pathlib import Path

from streampetr_plugin.cli.common import add_recipe_arguments, exit_on_recipe_error
from streampetr_plugin.config.loader import load_recipe
from streampetr_plugin.deploy.options import BACKENDS, DEFAULT_OPSET, DEFAULT_PARITY_FRAMES, MIN_OPSET, SPLITS
from streampetr_plugin.plugins import PluginHost


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``streampetr export``'s arguments to ``parser`` and set ``handler`` to :func:`run_export`."""
    add_recipe_arguments(parser)
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="trained checkpoint (ours or a reference .pth)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory (streampetr.onnx, export.json)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (>= {MIN_OPSET}); default {DEFAULT_OPSET}",
    )
    parser.add_argument(
        "--parity-frames",
        type=int,
        default=DEFAULT_PARITY_FRAMES,
        help=f"frames to compare onnxruntime and PyTorch on (0: skip); default {DEFAULT_PARITY_FRAMES}",
    )
    parser.set_defaults(handler=run_export)
    return parser


def run_export(args: argparse.Namespace, host: PluginHost) -> int:
    """The ``streampetr export`` command on parsed arguments."""
    from streampetr_plugin.deploy.export import export_command

    recipe = exit_on_recipe_error(lambda: load_recipe(args.recipe, args.overrides, host=host))
    result = export_command(
        recipe,
        host=host,
        checkpoint=args.checkpoint,
        out_dir=args.out,
        opset=args.opset,
        parity_frames=args.parity_frames,
    )
    if result.parity is not None:
        carried = result.parity.onnxruntime
        print(
            f"onnxruntime against PyTorch over {result.parity.frames} frames: logits within "
            f"{carried.max_logit_error:.1e}, box codes within {carried.max_box_error:.1e}; "
            f"{carried.detections} detections >= {result.parity.score_threshold}, "
            f"{carried.mismatched_frames} frames differing (export.json has the figures)"
        )
    print(result.onnx_path)
    return 0


def add_infer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``streampetr infer``'s arguments to ``parser`` and set ``handler`` to :func:`run_infer`."""
    add_recipe_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="trained checkpoint (ours or a reference .pth); required with --backend torch",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="default torch")
    parser.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="export directory (or .onnx file); required with --backend onnxruntime",
    )
    parser.add_argument("--split", choices=SPLITS, default="val", help="default val")
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default <work_dir>/infer/<backend>)"
    )
    parser.add_argument("--pictures", type=int, default=0, help="draw the first N samples (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of either backend (default: the recipe's cpu_threads setting)",
    )
    parser.add_argument("--tasks", nargs="+", choices=("detection", "tracking"), default=["detection"],
                        help="results to write: nuScenes detection and/or tracking (the recipe's tracker); "
                        "default: detection")
    parser.set_defaults(handler=run_infer)
    return parser


def run_infer(args: argparse.Namespace, host: PluginHost) -> int:
    """The ``streampetr infer`` command on parsed arguments."""
    from streampetr_plugin.deploy.infer import infer_command

    recipe = exit_on_recipe_error(lambda: load_recipe(args.recipe, args.overrides, host=host))
    result = infer_command(
        recipe,
        host=host,
        checkpoint=args.checkpoint,
        backend=args.backend,
        onnx_dir=args.onnx,
        split=args.split,
        out_dir=args.out,
        pictures=args.pictures,
        threads=args.threads,
        tasks=args.tasks,
    )
    print(
        f"{result.frames} frames ({args.backend}): {result.model_fps:.2f} frames/s (model), "
        f"{result.total_fps:.2f} frames/s (with data loading)"
    )
    for path in (result.results_path, result.tracking_results_path):
        if path is not None:
            print(path)
    return 0
