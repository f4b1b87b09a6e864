"""Generate the built-in synthetic nuScenes on first use (the demo recipe needs no download)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field

from .infos import create_infos
from .synthetic import make_synthetic

logger = logging.getLogger(__name__)


class SyntheticDataOptions(BaseModel):
    """What ``streampetr make-synthetic`` would generate."""

    model_config = ConfigDict(extra="forbid")

    scenes: int = Field(default=10, ge=2, description="scenes (split like the official mini_train / mini_val)")
    samples_per_scene: int = Field(default=10, ge=2, description="key frames per scene")
    objects_per_scene: int = Field(default=36, ge=1, description="annotated objects per scene")
    image_size: Tuple[int, int] = Field(default=(400, 225), description="camera image (width, height)")
    seed: int = Field(default=0, ge=0, description="generator seed (the dataset is deterministic for a seed)")


def ensure_synthetic_dataset(root: Path, options: SyntheticDataOptions, *, info_files: Sequence[str]) -> None:
    """Create ``root`` with a synthetic dataset and its infos unless every file in ``info_files`` exists.

    The dataset is written to a private temporary folder and renamed into place, so concurrent ranks
    (each building its dataset) never see a half-written one: the first rename wins, the others
    discard their copy.
    """
    if all((root / name).is_file() for name in info_files):
        return
    if root.exists() and any(root.iterdir()):
        raise FileNotFoundError(
            f"{root} exists but lacks {', '.join(info_files)}; build them with "
            f"`streampetr create-data --root {root} --version <version>` or remove the folder to regenerate"
        )
    logger.info("generating the synthetic nuScenes into %s (first use)", root)
    staging = root.parent / f".{root.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    dataset = make_synthetic(
        staging,
        num_scenes=options.scenes,
        samples_per_scene=options.samples_per_scene,
        objects_per_scene=options.objects_per_scene,
        image_size=tuple(options.image_size),
        seed=options.seed,
    )
    create_infos(staging, dataset.version)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
        if not all((root / name).is_file() for name in info_files):
            raise
