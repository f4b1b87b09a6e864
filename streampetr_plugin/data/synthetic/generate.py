"""Generate a synthetic nuScenes dataset: scene names and recording times, then every scene through
the table writer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np

from .splits import official_scene_names
from .tables import LOCATIONS, DatasetWriter

FIRST_TIMESTAMP_US = 1_533_151_603_547_590


@dataclass(frozen=True)
class SyntheticDataset:
    """What :func:`make_synthetic` wrote."""

    root: Path
    version: str
    train_scenes: Tuple[str, ...]
    val_scenes: Tuple[str, ...]
    num_samples: int
    image_size: Tuple[int, int]  # (width, height)


def make_synthetic(
    out_dir: str | Path,
    *,
    num_scenes: int = 10,
    samples_per_scene: int = 10,
    objects_per_scene: int = 36,
    image_size: Tuple[int, int] = (400, 225),
    version: str = "v1.0-mini",
    annotation_range: float = 55.0,
    uniform_classes: bool = False,
    extra_train_scenes: int = 0,
    jpeg_quality: int = 85,
    seed: int = 0,
) -> SyntheticDataset:
    """Write a synthetic nuScenes dataset to ``out_dir`` and describe it.

    ``image_size`` is (width, height); intrinsics are the nuScenes ones scaled by
    ``width / 1600`` and ``height / 900``. Objects are annotated at the key frames where their BEV
    distance to the ego is below ``annotation_range`` (one contiguous span per object). Classes follow
    nuScenes-like frequencies (cars most, trailers fewest), or are equally frequent with ``uniform_classes``.
    ``num_scenes`` are split 80 / 20 into training and validation scenes; ``extra_train_scenes`` more
    training scenes are generated after them, so the ``num_scenes`` scenes (validation ones included)
    are the same with or without them.
    Default size: 10 scenes x 10 samples, about 10 MB.
    """
    if samples_per_scene < 2:
        raise ValueError("samples_per_scene must be >= 2")
    train_names, val_names = official_scene_names(version, num_scenes, extra_train_scenes)
    writer = DatasetWriter(Path(out_dir), seed, image_size, jpeg_quality)
    first_train = len(train_names) - extra_train_scenes
    scene_names = train_names[:first_train] + val_names + train_names[first_train:]
    # Recording order, independent of the split; the extra scenes were recorded last.
    time_order = np.concatenate([writer.rng.permutation(num_scenes), np.arange(num_scenes, len(scene_names))])
    for scene_index, name in enumerate(scene_names):
        writer.write_scene(
            name, LOCATIONS[scene_index % len(LOCATIONS)],
            start_us=FIRST_TIMESTAMP_US + int(time_order[scene_index]) * 120_000_000,
            num_frames=samples_per_scene, objects_per_scene=objects_per_scene,
            annotation_range=annotation_range, uniform_classes=uniform_classes,
        )
    writer.save(version)
    return SyntheticDataset(
        root=Path(out_dir), version=version, train_scenes=tuple(train_names), val_scenes=tuple(val_names),
        num_samples=len(writer.tables["sample"]), image_size=tuple(image_size),
    )
