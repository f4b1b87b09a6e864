"""Benchmark results as dataclasses (``to_dict()`` is the JSON output) and as a text table."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

# The figure to beat: the step time the Ascend port of StreamPETR (Ascend/DrivingSDK,
# model_examples/StreamPETR) reports in its README for V2-99 800x320, batch 2 per device. The JSON
# report carries it as ``seed_reference``: the port this project started from.
SEED_SECONDS_PER_STEP = 0.615
SEED_DEVICE = "Ascend Atlas 800T A2 (8 devices, batch 2 per device, V2-99 800x320, fp16)"


@dataclass
class StepTimes:
    """Seconds per step: ``median``, ``p90`` (linear interpolation), ``mean``, ``min``, ``max`` and every
    timed step in ``times``."""

    median: float
    p90: float
    mean: float
    min: float
    max: float
    times: List[float]

    @classmethod
    def from_times(cls, times: Sequence[float]) -> "StepTimes":
        if not times:
            raise ValueError("no timed steps")
        values = [float(t) for t in times]
        return cls(
            median=float(statistics.median(values)),
            p90=float(np.percentile(values, 90)),
            mean=float(statistics.fmean(values)),
            min=min(values),
            max=max(values),
            times=values,
        )


@dataclass
class PhaseResult:
    """Training or inference of one configuration.

    ``samples_per_s`` = ``batch_size`` / median step time; ``tflops_per_s`` = ``flops_per_sample`` x
    ``batch_size`` / median step time / 1e12 (None when FLOPs were not counted). ``cpu_s_per_step`` is the
    median process CPU time (user + system, all threads) of a step: on a shared CPU it is less affected by
    other processes than the wall time. ``host_syncs_per_step``, ``blocking_uploads_per_step``,
    ``ops_per_step`` and ``kernel_launches_per_step`` (CUDA only) are counted on the baseline
    (:mod:`streampetr_plugin.bench.counting`); ``host_sync_sites`` and ``blocking_upload_sites`` say where
    they come from (``op at file:line``: number per step).
    """

    batch_size: int
    step_time_s: StepTimes
    samples_per_s: float
    peak_memory_mib: float
    peak_memory_kind: str
    flops_per_sample: Optional[int]
    tflops_per_s: Optional[float]
    cpu_s_per_step: Optional[float] = None
    nonfinite_steps: int = 0
    host_syncs_per_step: Optional[float] = None
    blocking_uploads_per_step: Optional[float] = None
    ops_per_step: Optional[float] = None
    kernel_launches_per_step: Optional[float] = None
    host_sync_sites: Dict[str, float] = field(default_factory=dict)
    blocking_upload_sites: Dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_times(
        cls,
        times: Sequence[float],
        *,
        cpu_times: Optional[Sequence[float]] = None,
        batch_size: int,
        peak_memory_mib: float,
        peak_memory_kind: str,
        flops_per_sample: Optional[int],
        nonfinite_steps: int = 0,
    ) -> "PhaseResult":
        step_time = StepTimes.from_times(times)
        tflops = None if flops_per_sample is None else flops_per_sample * batch_size / step_time.median / 1e12
        return cls(
            batch_size=batch_size,
            step_time_s=step_time,
            samples_per_s=batch_size / step_time.median,
            peak_memory_mib=peak_memory_mib,
            peak_memory_kind=peak_memory_kind,
            flops_per_sample=flops_per_sample,
            tflops_per_s=tflops,
            cpu_s_per_step=None if not cpu_times else float(statistics.median(cpu_times)),
            nonfinite_steps=nonfinite_steps,
        )


@dataclass
class ConfigurationResult:
    """One measured configuration: ``settings`` in effect, ``train`` and (with --inference) ``inference``."""

    name: str
    settings: Dict[str, str]
    train: PhaseResult
    inference: Optional[PhaseResult] = None


@dataclass
class VariantOutcome:
    """One variant option: ``status`` is ``measured``, ``baseline`` (the baseline runs this option),
    ``skipped`` or ``failed`` (``reason`` says why); ``speedup`` = baseline median / this median."""

    group: str
    option: str
    status: str
    reason: str = ""
    result: Optional[ConfigurationResult] = None
    speedup: Optional[float] = None


@dataclass
class DataPipelineResult:
    """The input pipeline of the recipe's training dataset.

    ``single_process`` times batches loaded in this process (``num_workers=0``): its samples/s is what
    one worker delivers. ``with_workers`` times the recipe's ``num_workers`` (None when that is 0).
    ``samples_per_s_per_worker`` = loader samples/s / workers. ``max_steps_per_s`` is the training rate
    the loader can feed at this batch size.
    """

    dataset: str
    num_samples: int
    batch_size: int
    num_workers: int
    single_process: PhaseResult
    with_workers: Optional[PhaseResult]
    samples_per_s_per_worker: float
    max_steps_per_s: float


@dataclass
class BenchReport:
    """Everything ``streampetr bench`` measured (``mode`` is ``model``, ``data``, ``backends`` or
    ``precision``)."""

    mode: str
    recipe: str
    overrides: List[str]
    device: Dict[str, Any]
    steps: int
    warmup: int
    image_hw: List[int]
    num_cameras: int
    boxes_per_frame: int
    adapters: List[Dict[str, str]] = field(default_factory=list)
    baseline: Optional[ConfigurationResult] = None
    variants: List[VariantOutcome] = field(default_factory=list)
    winners: Dict[str, str] = field(default_factory=dict)
    data: Optional[DataPipelineResult] = None
    backends: Optional[Dict[str, Any]] = None  # mode "backends": streampetr_plugin.deploy.bench
    precision: List[Dict[str, Any]] = field(default_factory=list)  # mode "precision": bench/precision_check
    seed_reference: Dict[str, Any] = field(
        default_factory=lambda: {"seconds_per_step": SEED_SECONDS_PER_STEP, "device": SEED_DEVICE}
    )
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        """The human-readable report."""
        lines = [
            f"streampetr bench {self.recipe} ({self.mode}) on {self.device.get('name', self.device['kind'])}",
        ]
        if self.device.get("load_average") is not None:
            load = f"{self.device['load_average']} -> {self.device.get('load_average_end')}"
            lines[0] += f", load average {load}"
        if self.overrides:
            lines.append(f"overrides: {' '.join(self.overrides)}")
        if self.mode == "data":
            lines.extend(_data_lines(self.data))
        elif self.mode == "backends":
            lines.extend(backend_lines(self.backends))
        elif self.mode == "precision":
            lines.extend(precision_lines(self.precision))
        else:
            lines.extend(self._model_lines())
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def _model_lines(self) -> List[str]:
        baseline = self.baseline
        height, width = self.image_hw
        lines = [
            f"batch {baseline.train.batch_size} x {self.num_cameras} cameras x {height}x{width}, "
            f"{self.boxes_per_frame} boxes per frame; {self.steps} timed steps after {self.warmup} warm-up",
            "baseline: " + ", ".join(f"{k} {v}" for k, v in baseline.settings.items()),
        ]
        lines.extend(_count_line(name, phase) for name, phase in (
            ("training step", baseline.train), ("inference frame", baseline.inference)
        ) if phase is not None and phase.host_syncs_per_step is not None)
        if baseline.train.flops_per_sample is not None:
            flops = f"{baseline.train.flops_per_sample / 1e9:,.1f} GFLOP per sample per training step"
            if baseline.inference is not None and baseline.inference.flops_per_sample is not None:
                flops += f", {baseline.inference.flops_per_sample / 1e9:,.1f} GFLOP per inference frame"
            lines.append(flops)
        header = ("configuration", "train s/step med", "p90", "cpu s", "samples/s", "peak MiB", "TFLOP/s",
                  "vs base", "infer s/frame", "fps")
        rows = [_row("baseline", baseline, 1.0)]
        for outcome in self.variants:
            name = f"{outcome.group}={outcome.option}"
            if outcome.status == "baseline":
                rows.append((name, "= baseline"))
            elif outcome.status == "measured":
                rows.append(_row(name, outcome.result, outcome.speedup))
            else:
                rows.append((name, f"{outcome.status}: {outcome.reason}"))
        lines.extend(_table(header, rows))
        median = baseline.train.step_time_s.median
        lines.append(
            f"Ascend port (DrivingSDK) reference: {SEED_SECONDS_PER_STEP} s/step on {SEED_DEVICE}; "
            f"this baseline: {median:.3f} s/step (comparable only for vov_8p at batch 2)"
        )
        if self.winners:
            lines.append("fastest on this device: " + "; ".join(f"{g}: {o}" for g, o in self.winners.items()))
        if self.adapters:
            applied = [a["name"] for a in self.adapters if a["status"] == "APPLIED"]
            lines.append(f"adapters applied: {', '.join(applied) or 'none'}")
        return lines


def _count_line(name: str, phase: PhaseResult) -> str:
    line = (f"per {name}: {phase.host_syncs_per_step:g} host syncs, {phase.blocking_uploads_per_step:g} "
            f"blocking uploads, {phase.ops_per_step:,.0f} ATen ops")
    if phase.kernel_launches_per_step is not None:
        line += f", {phase.kernel_launches_per_step:,.0f} kernel launches"
    return line


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(name: str, result: ConfigurationResult, speedup: Optional[float]) -> tuple:
    train, infer = result.train, result.inference
    return (
        name,
        _fmt(train.step_time_s.median),
        _fmt(train.step_time_s.p90),
        _fmt(train.cpu_s_per_step, 2),
        _fmt(train.samples_per_s, 2),
        _fmt(train.peak_memory_mib, 0),
        _fmt(train.tflops_per_s, 3),
        "-" if speedup is None else f"{speedup:.2f}x",
        _fmt(None if infer is None else infer.step_time_s.median),
        _fmt(None if infer is None else infer.samples_per_s, 2),
    )


def _table(header: tuple, rows: List[tuple]) -> List[str]:
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(str(row[i])) for row in [header, *full]) for i in range(len(header))]
    out = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths))]
    for row in rows:
        if len(row) == len(header):
            out.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        else:
            out.append(f"{row[0].ljust(widths[0])}  {row[1]}")
    return out


def _data_lines(data: DataPipelineResult) -> List[str]:
    single = data.single_process
    lines = [
        f"dataset {data.dataset}: {data.num_samples} samples, batch {data.batch_size}, "
        f"num_workers {data.num_workers}",
        f"one process: {single.samples_per_s:.2f} samples/s "
        f"({single.step_time_s.median:.3f} s per batch median, p90 {single.step_time_s.p90:.3f})",
    ]
    if data.with_workers is not None:
        loader = data.with_workers
        lines.append(
            f"{data.num_workers} workers: {loader.samples_per_s:.2f} samples/s "
            f"({loader.step_time_s.median:.3f} s per batch median, p90 {loader.step_time_s.p90:.3f})"
        )
    lines.append(
        f"{data.samples_per_s_per_worker:.2f} samples/s per worker; the loader keeps up with training "
        f"steps of {1.0 / data.max_steps_per_s:.3f} s or longer "
        f"({data.max_steps_per_s:.2f} steps/s at batch {data.batch_size})"
    )
    return lines


def backend_lines(comparison: Mapping[str, Any]) -> List[str]:
    """The comparison (as :meth:`BackendComparison.to_dict` gives it) as table lines."""
    baseline = comparison["timings"][0]["step_time_s"]["median"]
    title = (
        f"streaming inference, batch 1, {comparison['threads']} threads per backend, configurations "
        "alternating frame by frame"
    )
    if comparison["export_s"] is not None:
        title += f"; export took {comparison['export_s']:.1f} s"
    width = max(24, 2 + max(len(timing["name"]) for timing in comparison["timings"]))
    header = f"{'s/frame med':>12}{'p90':>8}{'cpu s':>8}{'frames/s':>10}{'vs first':>10}"
    lines = [title, f"{'configuration':<{width}}{header}"]
    for timing in comparison["timings"]:
        step = timing["step_time_s"]
        lines.append(
            f"{timing['name']:<{width}}{step['median']:>12.4f}{step['p90']:>8.4f}"
            f"{timing['cpu_s_per_frame']:>8.3f}{timing['frames_per_s']:>10.2f}"
            f"{baseline / step['median']:>9.2f}x"
        )
    return lines


def precision_lines(comparisons: Sequence[Mapping[str, Any]]) -> List[str]:
    """One line per autocast dtype against fp32 (``streampetr bench --precision``)."""
    lines = ["one training frame (batch 1, initial weights, the same random draws), autocast against fp32:"]
    for entry in comparisons:
        modules = ", ".join(f"{name} {cosine:.7f}" for name, cosine in entry["grad_cosine_per_module"].items())
        lines.append(
            f"{entry['dtype']}: neck features {entry['feature_rel_l2']:.2e} relative L2, total loss "
            f"{entry['total_loss_rel']:.2e} relative, most moved {entry['worst_loss_term']} "
            f"{entry['worst_loss_term_rel']:.2e}; gradient cosine {entry['grad_cosine']:.8f} ({modules}); "
            f"forward + backward {entry['seconds']:.2f} s"
        )
    return lines
