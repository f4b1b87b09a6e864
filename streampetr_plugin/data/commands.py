"""Data commands behind ``streampetr make-synthetic`` and ``streampetr create-data`` (argparse-free)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

from .infos import create_infos
from .synthetic import SyntheticDataset, make_synthetic, synthetic_version

__all__ = ["make_synthetic_command", "create_data_command"]

logger = logging.getLogger(__name__)


def make_synthetic_command(dir: str | Path, scenes: int = 10, seed: int = 0) -> SyntheticDataset:
    """Write a synthetic nuScenes dataset of ``scenes`` scenes into ``dir``.

    Up to 10 scenes use the v1.0-mini layout and split names, more use v1.0-trainval.
    """
    version = synthetic_version(scenes)
    dataset = make_synthetic(dir, num_scenes=scenes, seed=seed, version=version)
    logger.info(
        "wrote synthetic nuScenes %s to %s: %d train scenes, %d val scenes, %d samples; next: "
        "streampetr create-data --root %s --version %s",
        version, dataset.root, len(dataset.train_scenes), len(dataset.val_scenes), dataset.num_samples,
        dataset.root, version,
    )
    return dataset


def create_data_command(root: str | Path, version: str = "v1.0-trainval",
                        out_dir: Optional[str | Path] = None) -> Dict[str, Path]:
    """Build the StreamPETR info files of ``version`` under ``root`` (into ``out_dir``, default root)."""
    paths = create_infos(root, version, out_dir)
    for split, path in paths.items():
        logger.info("%s infos: %s", split, path)
    return paths
