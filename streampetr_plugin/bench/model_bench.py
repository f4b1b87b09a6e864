"""``streampetr bench`` on the model: training steps (and streaming inference) of a baseline and its variants.

Per configuration: build it (:class:`~streampetr_plugin.bench.train_step.BenchRun`), start a new
peak-memory window, run ``warmup`` untimed and ``steps`` timed training iterations on synthetic
streams of the recipe's shapes (frames continue from one step to the next, so the streaming memory is
exercised as in training), then, with ``inference``, the same for streaming inference frames at the
evaluation batch size. Every configuration is built afresh and released before the next one.

FLOPs are counted once, on the baseline (:mod:`streampetr_plugin.bench.measure`): forward and backward
of one training frame (and the forward of one inference frame), with checkpointing off and the
``math`` attention backend, i.e. the model's FLOPs without recomputation. No variant changes them, so
every configuration's TFLOP/s uses the same count: it is the useful work per second.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple


from streampetr_plugin.adapters.device import DeviceHandle
from streampetr_plugin.bench.counting import count_dispatch
from streampetr_plugin.bench.measure import (
    count_flops,
    counting_setup,
    peak_memory_kind,
    reset_peak_memory,
    time_steps,
)
from streampetr_plugin.bench.report import ConfigurationResult, PhaseResult, VariantOutcome
from streampetr_plugin.bench.synthetic_batch import (
    DEFAULT_BOXES_PER_FRAME,
    StreamShape,
    SyntheticStreams,
    stream_shape,
)
from streampetr_plugin.bench.train_step import BenchRun, adapter_rows
from streampetr_plugin.bench.variants import Variant, group_options
from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.plugins import PluginHost

logger = logging.getLogger(__name__)

RecipeLoader = Callable[[Sequence[str]], Recipe]
COUNTED_STEPS = 1  # host syncs and ops per step do not vary from step to step (GridMask aside)


@dataclass(frozen=True)
class Plan:
    """What to run for every configuration."""

    steps: int
    warmup: int
    inference: bool
    boxes_per_frame: int = DEFAULT_BOXES_PER_FRAME
    seed: int = 0


@dataclass(frozen=True)
class FlopCounts:
    """Model FLOPs per sample: one training frame (forward + backward), one inference frame (forward)."""

    train: int
    inference: Optional[int]


def _release(device: DeviceHandle) -> None:
    gc.collect()
    module = device.module
    if module is not None:
        module.empty_cache()


def count_model_flops(run: BenchRun, recipe: Recipe, plan: Plan) -> FlopCounts:
    """FLOPs per sample of ``run``'s model, counted on one-stream batches (the memory is reset after)."""
    model, device = run.model, run.device.torch_device
    single = dataclasses.replace(stream_shape(recipe, training=True), batch_size=1)
    train_streams = SyntheticStreams(single, boxes_per_frame=plan.boxes_per_frame, seed=plan.seed)
    train_batch = train_streams.frame(0, device)
    model.train()
    with counting_setup(model):
        train = count_flops(lambda: run.forward_backward(train_batch))
        inference = None
        if plan.inference:
            single_val = dataclasses.replace(stream_shape(recipe, training=False), batch_size=1)
            infer_batch = SyntheticStreams(single_val, with_targets=False, seed=plan.seed).frame(0, device)
            model.eval()
            inference = count_flops(lambda: run.infer_step(infer_batch))
            model.train()
    model.stream_state.reset()
    return FlopCounts(train=train, inference=inference)


def _measure_phase(
    run: BenchRun,
    shape: StreamShape,
    plan: Plan,
    *,
    training: bool,
    flops_per_sample: Optional[int],
    label: str,
    count: bool,
) -> PhaseResult:
    device = run.device
    streams = SyntheticStreams(
        shape, boxes_per_frame=plan.boxes_per_frame, with_targets=training, seed=plan.seed
    )
    run.model.train(training)
    run.model.stream_state.reset()
    step = run.train_step if training else run.infer_step

    def frame(index: int) -> dict:
        return streams.frame(index, device.torch_device)

    counts = None
    if count:
        # Before the timed steps: the counter's first step sees the optimiser state being made.
        logger.info("%s: counting host syncs and ops", label)
        counts = count_dispatch(step, frame, first=0, steps=COUNTED_STEPS, device_kind=device.kind)
        run.model.stream_state.reset()
    _release(device)
    reset_worked = reset_peak_memory(device)
    times, cpu_times = time_steps(
        step, frame, steps=plan.steps, warmup=plan.warmup, device=device, label=label,
    )
    result = PhaseResult.from_times(
        times,
        cpu_times=cpu_times,
        batch_size=shape.batch_size,
        peak_memory_mib=device.peak_memory_mib(),
        peak_memory_kind=peak_memory_kind(device, reset_worked),
        flops_per_sample=flops_per_sample,
        nonfinite_steps=run.nonfinite_steps if training else 0,
    )
    if counts is not None:
        result.host_syncs_per_step = counts.host_syncs
        result.blocking_uploads_per_step = counts.blocking_uploads
        result.ops_per_step = counts.ops
        result.kernel_launches_per_step = counts.kernel_launches
        result.host_sync_sites = counts.sync_sites
        result.blocking_upload_sites = counts.upload_sites
    return result


def measure_configuration(
    name: str,
    run: BenchRun,
    recipe: Recipe,
    plan: Plan,
    flops: FlopCounts,
    *,
    inference: bool,
    count: bool = False,
) -> ConfigurationResult:
    """Training (and, with ``inference``, streaming inference) timings of one built configuration;
    with ``count``, also its host syncs, ops and kernel launches per step."""
    settings = run.settings()
    logger.info("bench %s: %s", name, ", ".join(f"{k} {v}" for k, v in settings.items()))
    train = _measure_phase(
        run, stream_shape(recipe, training=True), plan, training=True, flops_per_sample=flops.train,
        label=f"bench {name}, training", count=count,
    )
    infer = None
    if inference:
        run.release_training_state()
        infer = _measure_phase(
            run, stream_shape(recipe, training=False), plan, training=False, flops_per_sample=flops.inference,
            label=f"bench {name}, inference", count=count,
        )
    logger.info("bench %s: %.3f s/step median", name, train.step_time_s.median)
    return ConfigurationResult(name=name, settings=settings, train=train, inference=infer)


def bench_model(
    load: RecipeLoader, device: DeviceHandle, plan: Plan, groups: Sequence[str], host: PluginHost
) -> Tuple[ConfigurationResult, List[VariantOutcome], Dict[str, str], List[Dict[str, str]]]:
    """Measure the baseline recipe (``load([])``) and every option of ``groups``, built with the components
    of ``host``.

    Returns the baseline, the variant outcomes, the fastest option per group (by median training
    step time, the baseline included) and the adapter records of the baseline configuration.
    """
    recipe = load([])
    logger.info("bench baseline: building %s on %s", recipe.name, device.describe())
    run = BenchRun(recipe, device, host)
    adapters = adapter_rows(run.adapters.records)
    logger.info("bench: counting the model's FLOPs on one frame (forward and backward, no checkpointing)")
    flops = count_model_flops(run, recipe, plan)
    baseline = measure_configuration(
        "baseline", run, recipe, plan, flops, inference=plan.inference, count=True
    )
    del run
    _release(device)
    outcomes: List[VariantOutcome] = []
    winners: Dict[str, str] = {}
    for group in groups:
        timings = {baseline.settings[group]: baseline.train.step_time_s.median}
        for option in group_options(group, host.registries.attention_backends):
            outcome = _run_variant(Variant(group, option), load, recipe, device, plan, flops, baseline, host)
            outcomes.append(outcome)
            if outcome.status == "measured":
                timings[option] = outcome.result.train.step_time_s.median
        if len(timings) > 1:
            winners[group] = min(timings, key=timings.get)
    return baseline, outcomes, winners, adapters


def _run_variant(
    variant: Variant,
    load: RecipeLoader,
    recipe: Recipe,
    device: DeviceHandle,
    plan: Plan,
    flops: FlopCounts,
    baseline: ConfigurationResult,
    host: PluginHost,
) -> VariantOutcome:
    group, option = variant.group, variant.option
    if baseline.settings[group] == option:
        return VariantOutcome(group, option, "baseline", "the baseline runs this option", speedup=1.0)
    reason = variant.unavailable_reason(device, recipe, baseline.settings, host.registries.attention_backends)
    if reason is not None:
        return VariantOutcome(group, option, "skipped", reason)
    try:
        logger.info("bench %s: building", variant.name)
        run = BenchRun(load(variant.recipe_overrides(device.kind)), device, host, variant.model_settings())
        result = measure_configuration(
            variant.name, run, run.recipe, plan, flops, inference=plan.inference and variant.affects_inference
        )
    except RuntimeError as error:  # e.g. out of device memory: report it, compare the rest
        logger.warning("bench %s failed: %s", variant.name, error)
        return VariantOutcome(group, option, "failed", f"{type(error).__name__}: {error}")
    finally:
        run = None  # free the model before the next configuration is built
        _release(device)
    if result.settings[group] != option:
        return VariantOutcome(
            group, option, "failed", f"asked for {option}, the set-up gave {result.settings[group]}", result
        )
    speedup = baseline.train.step_time_s.median / result.train.step_time_s.median
    return VariantOutcome(group, option, "measured", "", result, speedup)
