"""``streampetr bench``: time a recipe's training steps, streaming inference or input pipeline.

Usage: ``streampetr bench RECIPE [overrides] [--steps N --warmup K --json] [--inference] [--data]
[--variants GROUP ...] [--device KIND]`` (the command line: :mod:`streampetr_plugin.cli.bench`).

Examples::

    streampetr bench recipes/demo_cpu.yaml --steps 5 --warmup 1
    streampetr bench vov_8p --steps 20 --warmup 5 --inference --variants all --json > bench.json
    streampetr bench r50_8p data.num_workers=8 --data --steps 50
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence

from streampetr_plugin.errors import InputError
from streampetr_plugin.plugins import PluginHost


class BenchArgumentError(InputError, ValueError):
    """Options of ``streampetr bench`` that do not go together (exit 2, like any bad argument)."""


DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
BackendTimer = Callable[..., Dict[str, Any]]


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
    precision: Sequence[str] = (),
    host: Optional[PluginHost] = None,
    time_backends: Optional[BackendTimer] = None,
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
        precision: autocast dtypes (``bf16``, ``fp16``) to compare with fp32 on one training frame
            (:mod:`streampetr_plugin.bench.precision_check`) instead of timing steps.
        host: the plugin host whose components are benchmarked; None: a new one (built-in plugin and
            installed entry points).
        time_backends: ``(recipe, host, *, backend, steps, warmup) -> comparison dict`` for the
            ``backend`` comparisons (the command line passes one that runs
            :func:`streampetr_plugin.deploy.bench.bench_backends` or ``bench_cpu_levers``).

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
    from streampetr_plugin.bench.train_step import adapter_rows
    from streampetr_plugin.bench.variants import expand_groups
    from streampetr_plugin.config.loader import load_recipe
    from streampetr_plugin.host import create_plugin_host
    from streampetr_plugin.training.startup import select_device

    if steps < 1 or warmup < 0:
        raise BenchArgumentError(f"need steps >= 1 and warmup >= 0 (got steps={steps}, warmup={warmup})")
    groups = expand_groups(tuple(variants))
    if data and (groups or inference):
        raise BenchArgumentError("--data times the input pipeline only; run --inference / --variants without --data")
    if precision and (data or groups or inference or backend != "torch"):
        raise BenchArgumentError("--precision compares one training frame's numerics: use it without other modes")
    if backend != "torch" and (data or groups or not inference):
        raise BenchArgumentError(
            f"--backend {backend} compares inference configurations: use it with --inference alone"
        )
    all_overrides = [*overrides, *([f"accelerator.device={device}"] if device else [])]
    host = host if host is not None else create_plugin_host()
    base = load_recipe(recipe, all_overrides, host=host)
    selection = select_device(base, host)
    handle, device_records = selection.device, list(selection.adapters.records)
    if backend != "torch" and handle.kind != "cpu":
        raise BenchArgumentError(
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

        report.data = bench_data_pipeline(base, host.registries, steps=steps, warmup=warmup)
    elif precision:
        from streampetr_plugin.bench.precision_check import compare_precisions
        from streampetr_plugin.bench.train_step import BenchRun

        report.mode = "precision"
        run = BenchRun(recipe=base, device=handle, host=host)
        run.release_training_state()
        comparisons = compare_precisions(run.model, base, device=handle.torch_device, dtypes=precision)
        report.precision = [dataclasses.asdict(comparison) for comparison in comparisons]
        report.notes.append("inputs: one synthetic training frame of the recipe's shapes; initial weights")
    elif backend != "torch":
        if time_backends is None:
            raise ValueError(f"--backend {backend} needs the deployment's backend timer (time_backends)")
        report.mode = "backends"
        report.backends = time_backends(base, host, backend=backend, steps=steps, warmup=warmup)
        report.notes.append("inputs: synthetic frames at the recipe's test shapes; initial weights")
    else:
        plan = Plan(steps=steps, warmup=warmup, inference=inference, seed=base.runtime.seed)
        baseline, outcomes, winners, model_records = bench_model(
            lambda extra: load_recipe(recipe, [*all_overrides, *extra], host=host), handle, plan, groups, host
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
