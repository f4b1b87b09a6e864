"""nuScenes detection metric: predictions -> submission JSON -> nuscenes-devkit DetectionEval.

Follows mmdet3d-rc6 ``NuScenesDataset._format_bbox`` / ``_evaluate_single``: each box goes from the
sample's LiDAR frame to ego (dropping boxes beyond the devkit class range, BEV distance in the ego
frame) to global, gets the default attribute rule, and the devkit evaluates the file with the
``detection_cvpr_2019`` configuration on the split matching the version (``val`` for
v1.0-trainval, ``mini_val`` for v1.0-mini).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, TextIO

import numpy as np

from ..data.dataset import NUSCENES_CLASSES
from ..data.geometry import matrix_to_quaternion, pose_matrix
from ..data.infos import InfoSet

__all__ = [
    "DEFAULT_ATTRIBUTES",
    "EVAL_SPLITS",
    "evaluation_split",
    "format_nuscenes_results",
    "evaluate_nuscenes",
]

logger = logging.getLogger(__name__)

# mmdet3d NuScenesDataset.DefaultAttribute
DEFAULT_ATTRIBUTES: Dict[str, str] = {
    "car": "vehicle.parked",
    "pedestrian": "pedestrian.moving",
    "trailer": "vehicle.parked",
    "truck": "vehicle.parked",
    "bus": "vehicle.moving",
    "motorcycle": "cycle.without_rider",
    "construction_vehicle": "vehicle.parked",
    "bicycle": "cycle.without_rider",
    "barrier": "",
    "traffic_cone": "",
}
EVAL_SPLITS: Dict[str, str] = {"v1.0-trainval": "val", "v1.0-mini": "mini_val"}
SUBMISSION_META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False,
                   "use_external": True}
_TP_NAMES = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE",
             "attr_err": "mAAE"}


def _attribute(name: str, speed: float) -> str:
    if speed > 0.2:
        if name in ("car", "construction_vehicle", "bus", "truck", "trailer"):
            return "vehicle.moving"
        if name in ("bicycle", "motorcycle"):
            return "cycle.with_rider"
        return DEFAULT_ATTRIBUTES[name]
    if name == "pedestrian":
        return "pedestrian.standing"
    if name == "bus":
        return "vehicle.stopped"
    return DEFAULT_ATTRIBUTES[name]


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def evaluation_split(version: str) -> str:
    """The devkit split evaluated for ``version``: ``val`` for v1.0-trainval, ``mini_val`` for v1.0-mini."""
    if version not in EVAL_SPLITS:
        raise ValueError(f"no evaluation split known for {version!r}; pass eval_set")
    return EVAL_SPLITS[version]


def format_nuscenes_results(
    predictions: Mapping[str, Mapping[str, Any]],
    infos: InfoSet,
    *,
    classes: Sequence[str] = NUSCENES_CLASSES,
    class_range: Optional[Mapping[str, float]] = None,
) -> Dict[str, Any]:
    """Submission dict ``{meta, results: {sample_token: [record, ...]}}`` for every sample of ``infos``.

    ``predictions[token]`` holds ``boxes_3d`` (K, 9) (x, y, z_bottom, x_size, y_size, z_size, yaw,
    vx, vy) in that sample's LiDAR frame, ``scores_3d`` (K,) and ``labels_3d`` (K,) indices into
    ``classes`` (arrays or tensors). ``class_range`` (default: detection_cvpr_2019) drops boxes
    farther from the ego (BEV) than their class range. Raises ``ValueError`` when a sample of
    ``infos`` has no prediction or a prediction names a sample outside ``infos``.
    """
    if class_range is None:
        from nuscenes.eval.common.config import config_factory

        class_range = config_factory("detection_cvpr_2019").class_range
    tokens = [sample.token for sample in infos.samples]
    missing = [token for token in tokens if token not in predictions]
    unknown = sorted(set(predictions) - set(tokens))
    if missing or unknown:
        raise ValueError(
            f"predictions do not match the evaluated samples: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unknown)} unknown (e.g. {unknown[:3]})"
        )
    results: Dict[str, List[Dict[str, Any]]] = {}
    for sample in infos.samples:
        prediction = predictions[sample.token]
        boxes = _as_numpy(prediction["boxes_3d"]).astype(np.float64).reshape(-1, 9)
        scores = _as_numpy(prediction["scores_3d"]).astype(np.float64).reshape(-1)
        labels = _as_numpy(prediction["labels_3d"]).astype(np.int64).reshape(-1)
        lidar2ego = pose_matrix(sample.lidar2ego_rotation, sample.lidar2ego_translation)
        ego2global = pose_matrix(sample.ego2global_rotation, sample.ego2global_translation)
        centers = boxes[:, :3].copy()
        centers[:, 2] += boxes[:, 5] / 2  # bottom -> gravity centre
        centers_ego = centers @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
        records = []
        for box, score, label, center_ego in zip(boxes, scores, labels, centers_ego):
            name = classes[label]
            if np.linalg.norm(center_ego[:2]) > class_range[name]:
                continue
            cos, sin = np.cos(box[6]), np.sin(box[6])
            yaw_rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
            lidar2global = ego2global @ lidar2ego
            velocity = lidar2global[:3, :3] @ np.array([box[7], box[8], 0.0])
            records.append(
                {
                    "sample_token": sample.token,
                    "translation": (ego2global[:3, :3] @ center_ego + ego2global[:3, 3]).tolist(),
                    "size": [float(box[4]), float(box[3]), float(box[5])],  # devkit (w, l, h)
                    "rotation": matrix_to_quaternion(lidar2global[:3, :3] @ yaw_rotation).tolist(),
                    "velocity": velocity[:2].tolist(),
                    "detection_name": name,
                    "detection_score": float(score),
                    "attribute_name": _attribute(name, float(np.linalg.norm(velocity[:2]))),
                }
            )
        results[sample.token] = records
    return {"meta": dict(SUBMISSION_META), "results": results}


def evaluate_nuscenes(
    predictions: Mapping[str, Mapping[str, Any]],
    infos: InfoSet,
    *,
    root: str | Path,
    output_dir: str | Path,
    version: Optional[str] = None,
    classes: Sequence[str] = NUSCENES_CLASSES,
    eval_set: Optional[str] = None,
    nusc: Any = None,
) -> Dict[str, Any]:
    """Write ``<output_dir>/results_nusc.json``, run the devkit evaluation, log and return the metrics.

    Returns ``mAP``, ``NDS``, ``mATE``, ``mASE``, ``mAOE``, ``mAVE``, ``mAAE`` (floats),
    ``per_class`` {class: {AP, ATE, ASE, AOE, AVE, AAE}} and ``results_path``. Logs lines starting
    ``mAP:`` and ``NDS:``, the TP errors and a per-class table. ``version`` defaults to
    ``infos.version``; ``eval_set`` to ``val`` / ``mini_val`` by version; ``nusc`` reuses a loaded
    ``nuscenes.NuScenes``.
    """
    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    version = version or infos.version
    eval_set = eval_set or evaluation_split(version)
    config = config_factory("detection_cvpr_2019")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    submission = format_nuscenes_results(predictions, infos, classes=classes, class_range=config.class_range)
    results_path = output_dir / "results_nusc.json"
    with open(results_path, "w") as handle:
        json.dump(submission, handle)
    logger.info("nuScenes detection metric: %d samples of %s %s; files in %s", len(infos.samples), version,
                eval_set, output_dir)
    with _devkit_progress_bars_on_terminals_only():
        if nusc is None:
            nusc = NuScenes(version=version, dataroot=str(root), verbose=False)
        evaluator = DetectionEval(nusc, config=config, result_path=str(results_path), eval_set=eval_set,
                                  output_dir=str(output_dir), verbose=False)
        metrics, _ = evaluator.evaluate()
    summary = metrics.serialize()
    summary["meta"] = dict(evaluator.meta)
    with open(output_dir / "metrics_summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)

    result: Dict[str, Any] = {"mAP": float(summary["mean_ap"]), "NDS": float(summary["nd_score"])}
    for tp_name, short in _TP_NAMES.items():
        result[short] = float(summary["tp_errors"][tp_name])
    result["per_class"] = {
        name: {"AP": float(summary["mean_dist_aps"][name]),
               **{short[1:]: float(summary["label_tp_errors"][name][tp]) for tp, short in _TP_NAMES.items()}}
        for name in summary["mean_dist_aps"]
    }
    result["results_path"] = str(results_path)
    _log_metrics(result)
    return result


class _CompleteLines(io.TextIOBase):
    """A text stream that passes complete lines on to ``target`` and drops what was redrawn in place
    (everything before a line's last carriage return)."""

    def __init__(self, target: TextIO) -> None:
        self.target = target
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._pass_on(line)
        return len(text)

    def _pass_on(self, line: str) -> None:
        kept = line.rsplit("\r", 1)[-1]
        if kept.strip():
            self.target.write(kept + "\n")

    def close_pending(self) -> None:
        self._pass_on(self._pending)
        self._pending = ""


@contextlib.contextmanager
def _devkit_progress_bars_on_terminals_only() -> Iterator[None]:
    """The devkit draws tqdm bars on stderr whatever its ``verbose`` says (loading the ground truth);
    in a log file they leave fragments such as ``0/60``. Where stderr is not a terminal, only complete
    lines (warnings) get through."""
    if sys.stderr.isatty():
        yield
        return
    stream = _CompleteLines(sys.stderr)
    try:
        with contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.close_pending()


def _log_metrics(result: Mapping[str, Any]) -> None:
    logger.info("mAP: %.4f", result["mAP"])
    for short in _TP_NAMES.values():
        logger.info("%s: %.4f", short, result[short])
    logger.info("NDS: %.4f", result["NDS"])
    logger.info("Per-class results:")
    logger.info("%-20s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s", "Object Class", "AP", "ATE", "ASE", "AOE",
                "AVE", "AAE")
    for name, values in result["per_class"].items():
        logger.info(
            "%-20s\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f",
            name, values["AP"], values["ATE"], values["ASE"],
            values["AOE"], values["AVE"], values["AAE"],
        )
