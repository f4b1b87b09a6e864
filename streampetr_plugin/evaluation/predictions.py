"""The predictions file of an evaluation: what the detector predicted for every evaluated sample.

Each evaluation of a run has its directory ``<run_dir>/eval/iter_<iteration, 8 digits>/`` (the
devkit's output goes there too); the trainer writes the predictions there as ``predictions.npz``,
which ``streampetr visualize`` and offline tools read back. One ``.npz`` (read with
``allow_pickle=False``) holds the boxes of all samples concatenated, ragged by ``offsets``:

================  ===================  ======================================================
array             shape, dtype         meaning
================  ===================  ======================================================
``format``        () str               ``"streampetr-predictions"``
``version``       () i64               format version (1)
``sample_tokens`` (S,) str             nuScenes sample token of each sample
``offsets``       (S + 1,) i64         rows ``offsets[i]:offsets[i + 1]`` belong to sample i
``boxes_3d``      (K, 9) f32           (x, y, z_bottom, x_size, y_size, z_size, yaw, vx, vy),
                                       that sample's LiDAR frame (the detector's eval output)
``scores_3d``     (K,) f32             confidence
``labels_3d``     (K,) i64             class index in the recipe's ``data.class_names``
``query_ids_3d``  (K,) i64, optional   id of the decoder query each box came from
``track_ids_3d``  (K,) i64, optional   track id of each box (-1: untracked), when the
                                       evaluation tracked (docs/tracking.md)
================  ===================  ======================================================

The optional arrays are written when every sample has them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import numpy as np

from streampetr_plugin.errors import InputError, describe

__all__ = [
    "EVAL_DIR",
    "OPTIONAL_ARRAYS",
    "PREDICTIONS_FILE",
    "PREDICTIONS_FORMAT",
    "PREDICTIONS_FORMAT_VERSION",
    "evaluation_dir",
    "list_predictions",
    "load_predictions",
    "predictions_path",
    "save_predictions",
]

EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.npz"
PREDICTIONS_FORMAT = "streampetr-predictions"
PREDICTIONS_FORMAT_VERSION = 1
OPTIONAL_ARRAYS = ("query_ids_3d", "track_ids_3d")  # per box, int64
_EVALUATION_NAME = re.compile(r"^iter_(\d+)$")

Predictions = Mapping[str, Mapping[str, Any]]


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def evaluation_dir(run_dir: Union[str, Path], iteration: int) -> Path:
    """``<run_dir>/eval/iter_<iteration:08d>``: everything one evaluation writes."""
    return Path(run_dir) / EVAL_DIR / f"iter_{iteration:08d}"


def predictions_path(run_dir: Union[str, Path], iteration: int) -> Path:
    """``<run_dir>/eval/iter_<iteration:08d>/predictions.npz``."""
    return evaluation_dir(run_dir, iteration) / PREDICTIONS_FILE


def list_predictions(run_dir: Union[str, Path]) -> List[Tuple[int, Path]]:
    """(iteration, path) of every predictions file of a run, oldest first."""
    directory = Path(run_dir) / EVAL_DIR
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _EVALUATION_NAME.match(path.name)
        if match and (path / PREDICTIONS_FILE).is_file():
            found.append((int(match.group(1)), path / PREDICTIONS_FILE))
    return sorted(found)


def save_predictions(predictions: Predictions, path: Union[str, Path]) -> Path:
    """Write ``{sample_token: {"boxes_3d" (K, 9), "scores_3d" (K,), "labels_3d" (K,)}}`` (arrays or
    tensors, in insertion order; plus ``query_ids_3d`` / ``track_ids_3d`` (K,) where every sample has
    them) to ``path`` atomically (a reader never sees a partial file)."""
    path = Path(path)
    tokens = list(predictions)
    boxes, scores, labels = [], [], []
    for token in tokens:
        prediction = predictions[token]
        boxes.append(_as_numpy(prediction["boxes_3d"]).astype(np.float32).reshape(-1, 9))
        scores.append(_as_numpy(prediction["scores_3d"]).astype(np.float32).reshape(-1))
        labels.append(_as_numpy(prediction["labels_3d"]).astype(np.int64).reshape(-1))
        if not (len(boxes[-1]) == len(scores[-1]) == len(labels[-1])):
            raise ValueError(
                f"sample {token}: {len(boxes[-1])} boxes, {len(scores[-1])} scores, {len(labels[-1])} labels"
            )
    optional = {
        name: np.concatenate([_as_numpy(predictions[token][name]).astype(np.int64).reshape(-1)
                              for token in tokens])
        for name in OPTIONAL_ARRAYS
        if tokens and all(name in predictions[token] for token in tokens)
    }
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
    for name, values in optional.items():
        if len(values) != offsets[-1]:
            raise ValueError(f"{len(values)} {name} for {offsets[-1]} boxes")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(
            handle,
            format=np.array(PREDICTIONS_FORMAT),
            version=np.array(PREDICTIONS_FORMAT_VERSION, dtype=np.int64),
            sample_tokens=np.array(tokens, dtype=str).reshape(-1),
            offsets=offsets,
            boxes_3d=np.concatenate(boxes) if boxes else np.zeros((0, 9), np.float32),
            scores_3d=np.concatenate(scores) if scores else np.zeros(0, np.float32),
            labels_3d=np.concatenate(labels) if labels else np.zeros(0, np.int64),
            **optional,
        )
    os.replace(temporary, path)
    return path


ARRAY_NAMES = ("offsets", "sample_tokens", "boxes_3d", "scores_3d", "labels_3d")


class PredictionsFileError(InputError, ValueError):
    """A predictions file that cannot be read: damaged, of another format, or holding pickled objects."""


def load_predictions(path: Union[str, Path]) -> Dict[str, Dict[str, np.ndarray]]:
    """Read a predictions file: ``{sample_token: {"boxes_3d" (K, 9) f32, "scores_3d" (K,) f32,
    "labels_3d" (K,) i64}}`` (plus the optional arrays the file has) in the order written. Raises
    :class:`PredictionsFileError` (one line naming the file) for a damaged file, another format, or one
    that needs pickled objects (never loaded)."""
    name = os.fspath(path)
    fix = "evaluate the checkpoint again to rewrite it (streampetr eval RECIPE --checkpoint PATH)"
    try:
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != PREDICTIONS_FORMAT:
                raise PredictionsFileError(describe(name, f"is not a {PREDICTIONS_FORMAT} file", fix))
            if int(data["version"]) != PREDICTIONS_FORMAT_VERSION:
                found = int(data["version"])
                raise PredictionsFileError(describe(
                    name, f"format version {found}, this version reads {PREDICTIONS_FORMAT_VERSION}", fix
                ))
            arrays = {key: data[key] for key in ARRAY_NAMES}
            arrays.update({key: data[key] for key in OPTIONAL_ARRAYS if key in data.files})
    except (FileNotFoundError, PredictionsFileError):
        raise
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise PredictionsFileError(describe(name, f"is not a readable predictions file ({error})", fix))
        raise PredictionsFileError(describe(  # numpy refuses object arrays without unpickling them
            name, "holds arrays of pickled Python objects: refusing to unpickle them, nothing was run", fix
        )) from None
    except (OSError, KeyError, EOFError) as error:  # damaged, truncated, or an array missing
        problem = f"is not a readable predictions file ({error})"
        raise PredictionsFileError(describe(name, problem, fix)) from None
    offsets = arrays["offsets"]
    per_box = [key for key in ("boxes_3d", "scores_3d", "labels_3d", *OPTIONAL_ARRAYS) if key in arrays]
    return {
        str(token): {key: arrays[key][start:end] for key in per_box}
        for token, start, end in zip(arrays["sample_tokens"], offsets[:-1], offsets[1:])
    }
