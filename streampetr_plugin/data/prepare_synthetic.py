"""Generate the built-in synthetic nuScenes on first use (the demo recipe needs no download)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field

from .infos import create_infos
from .synthetic import make_synthetic, synthetic_version

logger = logging.getLogger(__name__)

OPTIONS_FILE = "synthetic_options.json"  # written into a generated dataset: the options it was made with


class SyntheticDataOptions(BaseModel):
    """What ``streampetr make-synthetic`` would generate."""

    model_config = ConfigDict(extra="forbid")

    scenes: int = Field(
        default=10, ge=2,
        description="scenes, 20% for validation, named after the official v1.0-mini scenes (up to 10) or "
        "v1.0-trainval ones (more; the dataset's version is then v1.0-trainval)",
    )
    samples_per_scene: int = Field(default=10, ge=2, description="key frames per scene")
    objects_per_scene: int = Field(default=36, ge=1, description="annotated objects per scene")
    image_size: Tuple[int, int] = Field(default=(400, 225), description="camera image (width, height)")
    annotation_range: float = Field(
        default=55.0, gt=0,
        description="objects are annotated (and drawn) while within this BEV distance of the ego, m",
    )
    uniform_classes: bool = Field(
        default=False, description="draw the ten classes equally often (default: nuScenes-like frequencies)"
    )
    extra_train_scenes: int = Field(
        default=0, ge=0,
        description="training scenes generated after the others: the first `scenes` stay as they are",
    )
    seed: int = Field(default=0, ge=0, description="generator seed (the dataset is deterministic for a seed)")


def ensure_synthetic_dataset(root: Path, options: SyntheticDataOptions, *, info_files: Sequence[str]) -> None:
    """Create ``root`` with a synthetic dataset and its infos unless it holds them (``info_files``) already.

    A dataset generated here records its options in ``root / OPTIONS_FILE``; when a recipe asks for other
    options it is moved aside and generated afresh (a folder without that file is never replaced).
    The dataset is written to a private temporary folder and renamed into place, so concurrent ranks
    (each building its dataset) never see a half-written one: the first rename wins, the others
    discard their copy.
    """
    wanted = options.model_dump(mode="json")
    if _has_infos(root, info_files):
        recorded = _recorded_options(root)
        if recorded is None or recorded == wanted:
            return
        changed = sorted(key for key in wanted if recorded.get(key) != wanted[key])
        logger.info("%s was generated with other synthetic options (%s): generating it afresh", root,
                    ", ".join(changed))
        _discard(root)
        if _has_infos(root, info_files) and _recorded_options(root) == wanted:
            return  # another process regenerated it meanwhile
    if root.exists() and any(root.iterdir()):
        raise FileNotFoundError(
            f"{root} exists but lacks {', '.join(info_files)}; build them with "
            f"`streampetr create-data --root {root} --version <version>` or remove the folder to regenerate"
        )
    logger.info("generating the synthetic nuScenes into %s", root)
    staging = root.parent / f".{root.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    dataset = make_synthetic(
        staging,
        num_scenes=options.scenes,
        samples_per_scene=options.samples_per_scene,
        objects_per_scene=options.objects_per_scene,
        image_size=tuple(options.image_size),
        annotation_range=options.annotation_range,
        uniform_classes=options.uniform_classes,
        extra_train_scenes=options.extra_train_scenes,
        version=synthetic_version(options.scenes + options.extra_train_scenes),
        seed=options.seed,
    )
    create_infos(staging, dataset.version)
    (staging / OPTIONS_FILE).write_text(json.dumps(wanted, indent=1), encoding="utf-8")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
        if not _has_infos(root, info_files):
            raise


def _has_infos(root: Path, info_files: Sequence[str]) -> bool:
    return all((root / name).is_file() for name in info_files)


def _recorded_options(root: Path) -> Optional[Dict[str, Any]]:
    """The options a generated dataset was made with; None for data not generated here."""
    path = root / OPTIONS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _discard(root: Path) -> None:
    """Remove a generated dataset: renamed aside first (atomic, one rank wins), then deleted."""
    stale = root.parent / f".{root.name}.stale-{os.getpid()}"
    try:
        os.rename(root, stale)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(stale, ignore_errors=True)
