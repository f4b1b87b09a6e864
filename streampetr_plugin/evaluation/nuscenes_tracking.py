"""nuScenes tracking metric: tracked predictions -> tracking submission JSON -> nuscenes-devkit TrackingEval.

The boxes go to the global frame exactly as for the detection submission
(:func:`~streampetr_plugin.evaluation.nuscenes_metric.format_nuscenes_results`), keep the track id a
tracker gave them (``streampetr_plugin.tracking``) and are scored with the devkit's ``tracking_nips_2019``
configuration (AMOTA, AMOTP, MOTA, IDS, FRAG, ...; the devkit applies its class ranges itself) on the split
matching the version (``val`` for v1.0-trainval, ``mini_val`` for v1.0-mini). Only the seven nuScenes
tracking classes are submitted.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from streampetr_plugin.data.dataset import NUSCENES_CLASSES
from streampetr_plugin.data.infos import InfoSet
from streampetr_plugin.evaluation.nuscenes_metric import (
    SUBMISSION_META,
    _devkit_progress_bars_on_terminals_only,
    evaluation_split,
    format_nuscenes_results,
)
from streampetr_plugin.evaluation.scenes import scenes_in_time_order
from streampetr_plugin.tracking.frame import NOT_TRACKED

__all__ = [
    "RESULTS_FILE",
    "SUMMARY_FILE",
    "TRACKING_CONFIG",
    "TRACKING_NAMES",
    "evaluate_tracking",
    "format_tracking_results",
]

logger = logging.getLogger(__name__)

TRACKING_CONFIG = "tracking_nips_2019"
# The tracking classes of the devkit's tracking_nips_2019 configuration (copied: formatting needs no
# devkit; a test checks that they agree).
TRACKING_NAMES = ("bicycle", "bus", "car", "motorcycle", "pedestrian", "trailer", "truck")
RESULTS_FILE = "results_nusc_tracking.json"
SUMMARY_FILE = "metrics_summary_tracking.json"
# (our name, the devkit's summary key): the averaged metrics first, then the CLEAR MOT ones at the
# recall threshold of best MOTA
_METRICS = (("AMOTA", "amota"), ("AMOTP", "amotp"), ("MOTA", "mota"), ("RECALL", "recall"),
            ("IDS", "ids"), ("FRAG", "frag"))
_COUNTS = ("IDS", "FRAG")
# metrics whose worst value the configuration knows (it leaves counts such as IDS unknown)
_WORST_WITHOUT_TRACKS = ("amota", "amotp", "recall", "motar", "mota", "motp")


def format_tracking_results(
    predictions: Mapping[str, Mapping[str, Any]],
    track_ids: Mapping[str, np.ndarray],
    infos: InfoSet,
    *,
    classes: Sequence[str] = NUSCENES_CLASSES,
) -> Dict[str, Any]:
    """Tracking submission ``{meta, results: {sample_token: [record, ...]}}``, sample tokens in scene order.

    ``predictions`` as for :func:`format_nuscenes_results`; ``track_ids[token]`` (K,) gives each of the
    sample's boxes its track id (``NOT_TRACKED``: not submitted). Records hold ``translation``, ``size``,
    ``rotation``, ``velocity`` (global frame), ``tracking_id`` (str), ``tracking_name`` and
    ``tracking_score`` (the detection score).
    """
    everywhere = {name: math.inf for name in classes}  # the devkit applies its own class ranges
    submission = format_nuscenes_results(predictions, infos, classes=classes, class_range=everywhere)
    detections = submission["results"]
    results: Dict[str, List[Dict[str, Any]]] = {}
    for scene in scenes_in_time_order(infos):
        for sample in scene:
            ids = np.asarray(track_ids[sample.token]).reshape(-1)
            records = detections[sample.token]
            if len(ids) != len(records):
                raise ValueError(f"sample {sample.token}: {len(records)} boxes but {len(ids)} track ids")
            results[sample.token] = [
                {
                    "sample_token": sample.token,
                    "translation": record["translation"],
                    "size": record["size"],
                    "rotation": record["rotation"],
                    "velocity": record["velocity"],
                    "tracking_id": str(int(track_id)),
                    "tracking_name": record["detection_name"],
                    "tracking_score": record["detection_score"],
                }
                for record, track_id in zip(records, ids)
                if track_id != NOT_TRACKED and record["detection_name"] in TRACKING_NAMES
            ]
    return {"meta": dict(SUBMISSION_META), "results": results}


def evaluate_tracking(
    predictions: Mapping[str, Mapping[str, Any]],
    track_ids: Mapping[str, np.ndarray],
    infos: InfoSet,
    *,
    root: str | Path,
    output_dir: str | Path,
    version: Optional[str] = None,
    classes: Sequence[str] = NUSCENES_CLASSES,
    eval_set: Optional[str] = None,
) -> Dict[str, Any]:
    """Write ``<output_dir>/results_nusc_tracking.json``, run the devkit's tracking evaluation, write
    ``metrics_summary_tracking.json``, log and return the metrics.

    Returns ``AMOTA``, ``AMOTP``, ``MOTA``, ``RECALL``, ``IDS``, ``FRAG`` (floats; the last four at the
    recall threshold of best MOTA), ``per_class`` {tracking class: the same six} and
    ``tracking_results_path``. Logs a line starting ``AMOTA:``, the others, and a per-class table.
    Without a single tracked box (an untrained detector) the devkit cannot run; every metric is then
    the configuration's worst (AMOTA 0, AMOTP 2 m), and IDS and FRAG 0.
    """
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.tracking.data_classes import TrackingMetrics
    from nuscenes.eval.tracking.evaluate import TrackingEval

    version = version or infos.version
    eval_set = eval_set or evaluation_split(version)
    config = config_factory(TRACKING_CONFIG)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / RESULTS_FILE
    submission = format_tracking_results(predictions, track_ids, infos, classes=classes)
    with open(results_path, "w") as handle:
        json.dump(submission, handle)
    logger.info("nuScenes tracking metric: %d samples of %s %s; files in %s", len(infos.samples), version,
                eval_set, output_dir)
    if any(submission["results"].values()):
        with _devkit_progress_bars_on_terminals_only():
            evaluator = TrackingEval(config=config, result_path=str(results_path), eval_set=eval_set,
                                     output_dir=str(output_dir), nusc_version=version,
                                     nusc_dataroot=str(root), verbose=False)
            metrics, _ = evaluator.evaluate()
        meta = evaluator.meta
    else:
        logger.warning("nuScenes tracking metric: no tracked box in any sample; every metric at its worst")
        metrics, meta = TrackingMetrics(config), submission["meta"]
        for name in config.class_names:
            for metric in _WORST_WITHOUT_TRACKS:
                metrics.add_label_metric(metric, name, config.metric_worst[metric])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # means of metrics no class has (all NaN)
        summary = metrics.serialize()
    summary["meta"] = dict(meta)
    with open(output_dir / SUMMARY_FILE, "w") as handle:
        json.dump(summary, handle, indent=2)

    result: Dict[str, Any] = {name: float(summary[key]) for name, key in _METRICS}
    result["per_class"] = {
        name: {ours: float(summary["label_metrics"][key][name]) for ours, key in _METRICS}
        for name in summary["label_metrics"]["amota"]
    }
    result["tracking_results_path"] = str(results_path)
    _log_metrics(result)
    return result


def _log_metrics(result: Mapping[str, Any]) -> None:
    for name, _ in _METRICS:
        logger.info("%s: %.0f" if name in _COUNTS else "%s: %.4f", name, result[name])
    logger.info("Per-class results:")
    logger.info("%-20s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s", "Object Class", *(name for name, _ in _METRICS))
    for name, values in result["per_class"].items():
        logger.info("%-20s\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.0f\t%-6.0f", name,
                    *(values[metric] for metric, _ in _METRICS))
