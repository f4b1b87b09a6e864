"""Evaluation during and after training: predictions of the val set, gathered and scored on rank 0.

Each rank runs its contiguous, time-ordered slice of the val set through the detector (inference mode,
streaming memory reset before and after, as the reference resets around its evaluation), the
per-sample predictions are gathered in rank order, and rank 0 scores them with the evaluator: the
detection metric and, when asked (``tracking.evaluate``, ``streampetr eval --tasks tracking``), the
recipe's tracker and the tracking metric.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from streampetr_plugin.errors import InputError, describe
from streampetr_plugin.models.outputs import InferenceOutputs
from streampetr_plugin.models.stream_state import stream_state_of
from streampetr_plugin.training import distributed
from streampetr_plugin.training.batches import move_to_device

if TYPE_CHECKING:
    from streampetr_plugin.plugins import PluginHost, Registries
    from streampetr_plugin.training.distributed import DistributedEnv

logger = logging.getLogger(__name__)

Predictions = Dict[str, Dict[str, torch.Tensor]]
Evaluator = Callable[[Predictions, Any, Path], Dict[str, Any]]


def reset_streams(model: nn.Module) -> None:
    """Forget every stream, when the model keeps any (its ``stream_state``)."""
    state = stream_state_of(model)
    if state is not None:
        state.reset()


@torch.no_grad()
def collect_predictions(
    model: nn.Module, loader: Iterable[Dict[str, Any]], *, device: torch.device, autocast: ContextManager
) -> Predictions:
    """``{sample_token: {"boxes_3d", "scores_3d", "labels_3d"}}`` (CPU tensors) of this rank's slice.

    The model is put in eval mode with fresh streams and left in training mode with fresh streams. A
    padded val set repeats samples at its end: each token keeps its first result.
    """
    reset_streams(model)
    model.eval()
    predictions: Predictions = {}
    try:
        with autocast:
            for batch in loader:
                outputs: InferenceOutputs = model(move_to_device(batch, device))
                for token, output in zip(batch["sample_token"], outputs.detections):
                    predictions.setdefault(token, {key: value.cpu() for key, value in output.items()})
    finally:
        reset_streams(model)
        model.train()
    return predictions


def merge_predictions(parts: List[Predictions]) -> Predictions:
    """One dict from every rank's (rank order; a token's first occurrence wins)."""
    merged: Predictions = {}
    for part in parts:
        for token, output in part.items():
            merged.setdefault(token, output)
    return merged


def stream_starts(parts: List[Predictions]) -> List[str]:
    """The first sample of every rank's part after rank 0's: where the detector's streams restarted in
    the middle of a scene that two ranks share (each rank evaluates with fresh streams)."""
    return [next(iter(part)) for part in parts[1:] if part]


def default_evaluator(predictions: Predictions, dataset: Any, output_dir: Path) -> Dict[str, Any]:
    """The dataset's own ``evaluate(predictions, output_dir=...)`` when it has one (datasets from
    plugins), else the official nuScenes metric over the samples of a nuScenes dataset."""
    own_metric = getattr(dataset, "evaluate", None)
    if callable(own_metric):
        return own_metric(predictions, output_dir=output_dir)
    from streampetr_plugin.data.infos import InfoSet
    from streampetr_plugin.evaluation.nuscenes_metric import evaluate_nuscenes

    infos = InfoSet(version=dataset.version, samples=list(dataset.samples))
    return evaluate_nuscenes(
        predictions, infos, root=dataset.root, output_dir=output_dir, classes=dataset.classes
    )


def tracking_evaluator(
    recipe: Any,
    registries: "Registries",
    predictions: Predictions,
    dataset: Any,
    output_dir: Path,
    *,
    restarts: Sequence[str] = (),
) -> Dict[str, Any]:
    """Track the val set with the recipe's tracker (from ``registries``) and score the nuScenes tracking
    metric; ``restarts``: samples where the detector's streams restarted within a scene
    (:func:`stream_starts`).

    Gives every prediction its boxes' track ids (``track_ids_3d`` (K,), -1 where untracked), which
    ``predictions.npz`` then keeps. Returns ``AMOTA``, ``AMOTP``, ``MOTA``, ``RECALL``, ``IDS``, ``FRAG``,
    ``tracking_per_class`` and ``tracking_results_path``.
    """
    from streampetr_plugin.data.infos import InfoSet
    from streampetr_plugin.evaluation.nuscenes_tracking import evaluate_tracking
    from streampetr_plugin.evaluation.scenes import track_scenes
    from streampetr_plugin.tracking.build import build_tracker

    if not all(hasattr(dataset, name) for name in ("samples", "version", "root", "classes")):
        raise InputError(describe(
            "tracking", f"the val dataset ({type(dataset).__name__}) is not a nuScenes dataset",
            "score tracking on a nuScenes val set, or set tracking.evaluate=false",
        ))
    infos = InfoSet(version=dataset.version, samples=list(dataset.samples))
    track_ids = track_scenes(build_tracker(recipe, registries), predictions, infos, classes=dataset.classes,
                             restarts=restarts)
    for token, ids in track_ids.items():
        predictions[token]["track_ids_3d"] = torch.from_numpy(ids)
    metrics = evaluate_tracking(predictions, track_ids, infos, root=dataset.root, output_dir=output_dir,
                                classes=dataset.classes)
    return {**metrics, "tracking_per_class": metrics.pop("per_class")}


@dataclass
class EvaluationOutputs:
    """Where one evaluation's files are: its directory (the metric's files), the predictions file and
    the picture of the first val sample (None for datasets that cannot draw one)."""

    directory: Path
    predictions: Path
    picture: Optional[Path]


@dataclass
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` measured and wrote."""

    metrics: Dict[str, Any]
    outputs: EvaluationOutputs


def save_evaluation_outputs(
    predictions: Predictions, dataset: Any, output_dir: Path, *, class_names: Sequence[str]
) -> EvaluationOutputs:
    """Write ``predictions.npz`` and, for nuScenes-style datasets, a PNG of the first val sample.

    These are what ``streampetr visualize --run`` reads.
    """
    from streampetr_plugin.evaluation.predictions import PREDICTIONS_FILE, save_predictions

    predictions_file = save_predictions(predictions, output_dir / PREDICTIONS_FILE)
    outputs = EvaluationOutputs(directory=output_dir, predictions=predictions_file, picture=None)
    samples = getattr(dataset, "samples", None)
    if samples and hasattr(dataset, "load_images") and samples[0].token in predictions:
        from streampetr_plugin.visualization.dataset_pictures import render_dataset_sample

        token = samples[0].token
        outputs.picture = render_dataset_sample(
            dataset, 0, predictions[token], output_dir / f"sample_{token}.png", class_names=class_names
        )
    return outputs


class RunEvaluation:
    """The evaluations of a training run (collective: every rank calls it); the val set is built at the
    first.

    Args:
        recipe: the run's recipe (val batch size, class names, ``tracking.evaluate``).
        registries: the run's components (the val dataset, the tracker).
        make_loader: ``(dataset, batch_size, *, training) -> loader`` over this rank's slice.
        evaluator: scores the merged predictions on rank 0 (:data:`Evaluator`).
        dist_env: the process layout.
        work_dir: each evaluation writes to ``<work_dir>/eval/iter_<iteration>``.
    """

    def __init__(
        self,
        recipe: Any,
        registries: "Registries",
        *,
        make_loader: Callable[..., Any],
        evaluator: Evaluator,
        dist_env: "DistributedEnv",
        work_dir: Path,
    ) -> None:
        self.recipe = recipe
        self.registries = registries
        self.make_loader = make_loader
        self.evaluator = evaluator
        self.dist_env = dist_env
        self.work_dir = work_dir
        self.dataset: Any = None
        self.loader: Any = None
        self.last_outputs: Optional[EvaluationOutputs] = None  # the last evaluation's directory and picture

    def __call__(
        self, model: nn.Module, *, iteration: int, device: torch.device, autocast: ContextManager
    ) -> Dict[str, Any]:
        """Run the val set (each rank its slice), gather the predictions, score them on rank 0; returns
        the metrics on rank 0, an empty dict elsewhere."""
        from streampetr_plugin.data.build import build_dataset

        recipe = self.recipe
        distributed.broadcast_buffers(model)  # every rank scores with the statistics checkpoints hold
        if self.loader is None:
            self.dataset = build_dataset(recipe, self.registries, training=False)
            batch_size = recipe.data.val_batch_size_per_device
            self.loader = self.make_loader(self.dataset, batch_size, training=False)
        started = time.perf_counter()
        predictions = collect_predictions(model, self.loader, device=device, autocast=autocast)
        gathered = distributed.all_gather_objects(predictions)
        metrics: Dict[str, Any] = {}
        if self.dist_env.is_main:
            merged = merge_predictions(gathered)
            output_dir = self.work_dir / "eval" / f"iter_{iteration:08d}"
            output_dir.mkdir(parents=True, exist_ok=True)
            metrics = dict(self.evaluator(merged, self.dataset, output_dir))
            if recipe.tracking.evaluate:
                restarts = stream_starts(gathered)
                metrics.update(tracking_evaluator(
                    recipe, self.registries, merged, self.dataset, output_dir, restarts=restarts
                ))
            self.last_outputs = save_evaluation_outputs(
                merged, self.dataset, output_dir, class_names=recipe.data.class_names
            )
            logger.info(
                "evaluation at iteration %d: %d samples in %.1f s: %s",
                iteration, len(merged), time.perf_counter() - started,
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
            )
        distributed.barrier()
        return metrics


def new_evaluation_dir(work_dir: Path, checkpoint: Path) -> Path:
    """A directory no earlier evaluation used: ``<work_dir>/eval_<checkpoint stem>_<YYYYmmdd-HHMMSS>``
    (``-2``, ``-3``, ... appended when that exists)."""
    base = Path(work_dir) / f"eval_{checkpoint.stem}_{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, number = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            number += 1
            candidate = base.with_name(f"{base.name}-{number}")


def evaluate_checkpoint(
    recipe: Any,
    checkpoint: Path,
    *,
    host: "PluginHost",
    output_dir: Optional[Path] = None,
    tasks: Sequence[str] = ("detection",),
) -> CheckpointEvaluation:
    """Score ``checkpoint`` (ours, or a reference ``.pth``) on the recipe's val set, in one process, for
    ``tasks``: ``"detection"`` (the detection metric) and/or ``"tracking"`` (the recipe's tracker and
    the tracking metric, :func:`tracking_evaluator`).

    The device and its accelerator adapters are set up as the trainer sets them up (the recipe's
    ``accelerator`` section: device kind, thread count, attention kernels, ...), then those of the
    inference phase (BatchNorm folding, ...), and the model runs under the recipe's precision. Results go
    to ``output_dir`` (default: :func:`new_evaluation_dir`, never a training run's own ``eval/iter_*``):
    the metric's files, ``predictions.npz`` and a picture of the first val sample.
    """
    from streampetr_plugin.adapters.base import Phase, Status
    from streampetr_plugin.data.build import build_dataset
    from streampetr_plugin.data.loader import build_dataloader
    from streampetr_plugin.interop.checkpoint import load_reference_checkpoint
    from streampetr_plugin.training.startup import build_device_model, select_device

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InputError(describe(str(checkpoint), "no such checkpoint file", "check the --checkpoint path"))
    selection = select_device(recipe, host)
    device = selection.device
    model, precision = build_device_model(recipe, host, selection)
    report = load_reference_checkpoint(model, checkpoint)
    if report.missing or report.shape_mismatch:
        raise InputError(describe(
            str(checkpoint), f"does not fit the recipe's model: {report.summary()}",
            "evaluate it with the recipe it was trained with",
        ))
    model.eval()  # the inference adapters (BatchNorm folding, ...) act on the loaded weights in eval mode
    selection.adapters.run(Phase.INFERENCE, selection.context)
    records = selection.adapters.records
    applied = [record.name for record in records if record.status is Status.APPLIED]
    dataset = build_dataset(recipe, host.registries, training=False)
    if output_dir is None:
        output_dir = new_evaluation_dir(recipe.work_dir(), checkpoint)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "evaluating %s on %d val samples, device %s (adapters applied: %s); results go to %s",
        checkpoint, len(dataset), device.describe(), ", ".join(applied) or "none", output_dir,
    )
    loader = build_dataloader(
        dataset,
        batch_size=recipe.data.val_batch_size_per_device,
        num_workers=recipe.data.num_workers,
        rank=0,
        world_size=1,
        seed=recipe.runtime.seed,
        training=False,
    )
    predictions = collect_predictions(
        model, loader, device=device.torch_device, autocast=precision.autocast()
    )
    metrics = dict(default_evaluator(predictions, dataset, output_dir)) if "detection" in tasks else {}
    if "tracking" in tasks:
        metrics.update(tracking_evaluator(recipe, host.registries, predictions, dataset, output_dir))
    outputs = save_evaluation_outputs(predictions, dataset, output_dir, class_names=recipe.data.class_names)
    logger.info("evaluation of %s written to %s%s", checkpoint, output_dir,
                f" (picture: {outputs.picture})" if outputs.picture is not None else "")
    return CheckpointEvaluation(metrics=metrics, outputs=outputs)
