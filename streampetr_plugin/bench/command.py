"""``streampetr bench``: time a recipe's training steps, streaming inference or input pipeline.

Usage: ``streampetr bench RECIPE [overrides] [--steps N --warmup K --json] [--inference] [--data]
[--variants GROUP ...] [--device KIND]``.

Wire it into a CLI with :func:`add_bench_arguments` (it sets ``run`` to :func:`run_bench`)::

    add_bench_arguments(commands.add_parser("bench", help="time training steps, inference and data loading"))

Examples::

    streampetr bench recipes/demo_cpu.yaml --steps 5 --warmup 1
    streampetr bench vov_8p --steps 20 --warmup 5 --inference --variants all --json > bench.json
    streampetr bench r50_8p data.num_workers=8 --data --steps 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

from streampetr_plugin.bench import VARIANT_GROUPS


DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")


def bench_command(
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    steps: int = 10,
    warmup: int = 2,
    inference: bool = False,
    data: bool = False,
    variants: Sequence[str] = (),
    as_json: bool = False,
    device: Optional[str] = None,
    backend: str = "torch",
) -> Dict[str, Any]:
    """Benchmark ``recipe`` and write the report to stdout (JSON with ``as_json``, else a table).

    Args:
        recipe: recipe file or shipped recipe name.
        overrides: ``a.b=value`` / ``~a.b`` recipe overrides.
        steps: timed steps (batches in ``data`` mode), >= 1.
        warmup: untimed steps before them, >= 0.
        inference: also time streaming inference (evaluation batch size) per configuration.
        data: time the training input pipeline on the recipe's dataset instead of the model.
        variants: variant groups to compare with the baseline (``attention``, ``checkpointing``,
            ``amp``, ``channels_last``, ``fused_optimizer``) or ``all``.
        as_json: write the report as JSON.
        device: ``auto`` / ``npu`` / ``cuda`` / ``cpu``; None: the recipe's ``accelerator.device``.
        backend: ``onnxruntime`` (with ``inference``): time streaming inference of the exported graph in
            onnxruntime against PyTorch, alternating frame by frame, instead of the training steps
            (:mod:`streampetr_plugin.deploy.bench`); ``torch-cpu-levers``: the same for PyTorch as built
            against BatchNorm folding and a channels-last backbone.

    Returns:
        The report as a dict (:meth:`BenchReport.to_dict`): ``mode``, ``recipe``, ``overrides``,
        ``device``, ``steps``, ``warmup``, ``image_hw``, ``num_cameras``, ``boxes_per_frame``,
        ``adapters``, ``baseline``, ``variants``, ``winners``, ``data``, ``seed_reference``, ``notes``.
    """
    # Heavy imports here, so that building the CLI parser stays cheap.
    from streampetr_plugin.bench.measure import describe_device
    from streampetr_plugin.bench.model_bench import Plan, bench_model
    from streampetr_plugin.bench.report import BenchReport
    from streampetr_plugin.bench.synthetic_batch import DEFAULT_BOXES_PER_FRAME, NUM_CAMERAS, stream_shape
    from streampetr_plugin.bench.train_step import adapter_rows, select_device
    from streampetr_plugin.bench.variants import expand_groups
    from streampetr_plugin.config.loader import load_recipe

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0 (got steps={steps}, warmup={warmup})")
    groups = expand_groups(tuple(variants))
    if data and (groups or inference):
        raise ValueError("--data times the input pipeline only; run --inference / --variants without --data")
    if backend != "torch" and (data or groups or not inference):
        raise ValueError(
            f"--backend {backend} compares inference configurations: use it with --inference alone"
        )
    all_overrides = [*overrides, *([f"accelerator.device={device}"] if device else [])]
    base = load_recipe(recipe, all_overrides)
    handle, device_records = select_device(base)
    if backend != "torch" and handle.kind != "cpu":
        raise ValueError(
            f"--backend {backend} compares inference configurations on the CPU: add --device cpu"
        )
    shape = stream_shape(base, training=True)
    report = BenchReport(
        mode="data" if data else "model",
        recipe=base.name,
        overrides=list(all_overrides),
        device=describe_device(handle),
        steps=steps,
        warmup=warmup,
        image_hw=list(shape.image_hw),
        num_cameras=NUM_CAMERAS,
        boxes_per_frame=DEFAULT_BOXES_PER_FRAME,
    )
    if data:
        from streampetr_plugin.bench.data_pipeline import bench_data_pipeline

        report.data = bench_data_pipeline(base, steps=steps, warmup=warmup)
    elif backend != "torch":
        from streampetr_plugin.deploy.bench import bench_backends, bench_cpu_levers

        bench = bench_backends if backend == "onnxruntime" else bench_cpu_levers
        report.mode = "backends"
        report.backends = bench(base, steps=steps, warmup=warmup).to_dict()
        report.notes.append("inputs: synthetic frames at the recipe's test shapes; initial weights")
    else:
        plan = Plan(steps=steps, warmup=warmup, inference=inference, seed=base.runtime.seed)
        baseline, outcomes, winners, model_records = bench_model(
            lambda extra: load_recipe(recipe, [*all_overrides, *extra]), handle, plan, groups
        )
        report.baseline, report.variants, report.winners = baseline, outcomes, winners
        report.adapters = adapter_rows(device_records) + model_records
        report.notes.extend(_model_notes(handle.kind))
    if handle.kind == "cpu":
        report.device["load_average_end"] = round(os.getloadavg()[0], 2)  # other processes skew CPU timings
    payload = report.to_dict()
    sys.stdout.write((json.dumps(payload, indent=2) if as_json else report.format_table()) + "\n")
    return payload


def _model_notes(device_kind: str) -> list:
    notes = [
        "inputs are synthetic tensors of the recipe's shapes (no data loading in the step time); weights "
        "are the initialisation (runtime.load_from is not read)",
        "FLOPs: model FLOPs counted once with torch.utils.flop_counter (no checkpoint recomputation); "
        "TFLOP/s of every configuration uses that count",
    ]
    if device_kind == "cpu":
        notes.append("CPU: fp32 only; peak memory is the process's peak resident set size")
    return notes


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``streampetr bench``'s arguments to ``parser`` and set ``run`` to :func:`run_bench`."""
    parser.add_argument("recipe", help="recipe file or shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="a.b=value to set, ~a.b to delete")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (batches with --data); default 10")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first; default 2")
    parser.add_argument("--inference", action="store_true", help="also time streaming inference")
    parser.add_argument(
        "--data", action="store_true", help="time the training input pipeline instead of the model"
    )
    parser.add_argument(
        "--variants", nargs="+", default=[], metavar="GROUP", choices=(*VARIANT_GROUPS, "all"),
        help=f"compare variants of: {', '.join(VARIANT_GROUPS)}, or all",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--device", choices=DEVICE_CHOICES, default=None,
        help="device kind; default: the recipe's accelerator.device",
    )
    parser.add_argument(
        "--backend", choices=("torch", "onnxruntime", "torch-cpu-levers"), default="torch",
        help="with --inference: onnxruntime times the exported graph against PyTorch, torch-cpu-levers "
        "PyTorch with BatchNorm folding and a channels-last backbone (CPU, inference only)",
    )
    parser.set_defaults(run=run_bench)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """The ``streampetr bench`` command on parsed arguments; exit status 0, 2 on a recipe error."""
    from streampetr_plugin.cli.common import exit_on_recipe_error

    exit_on_recipe_error(
        lambda: bench_command(
            args.recipe,
            args.overrides,
            steps=args.steps,
            warmup=args.warmup,
            inference=args.inference,
            data=args.data,
            variants=args.variants,
            as_json=args.as_json,
            device=args.device,
            backend=args.backend,
        )
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m streampetr_plugin.bench.command RECIPE ...`` (the same as ``streampetr bench``)."""
    from streampetr_plugin.cli.common import setup_logging

    parser = add_bench_arguments(argparse.ArgumentParser(prog="streampetr bench"))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
