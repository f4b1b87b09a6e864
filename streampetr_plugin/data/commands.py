"""Data commands behind ``streampetr make-synthetic`` and ``streampetr create-data`` (argparse-free)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

from streampetr_plugin.errors import InputError, describe

from .infos import create_infos
from .synthetic import SyntheticDataset, make_synthetic, synthetic_version

__all__ = ["make_synthetic_command", "create_data_command"]

logger = logging.getLogger(__name__)


def make_synthetic_command(dir: str | Path, scenes: int = 10, seed: int = 0) -> SyntheticDataset:
    """Write a synthetic nuScenes dataset of ``scenes`` scenes into ``dir``.

    Up to 10 scenes use the v1.0-mini layout and split names, more use v1.0-trainval.
    """
    if scenes < 2:
        raise InputError(describe("--scenes", f"{scenes} is too few", "at least 2: one train, one val scene"))
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
    """Build the StreamPETR info files of ``version`` under ``root`` (into ``out_dir``, default root).

    A missing root or version folder, or a table that is not valid JSON (a truncated download), is an
    :class:`InputError` naming it.
    """
    root = Path(root)
    if not root.is_dir():
        fix = "--root names the folder that holds samples/ and the version folder"
        raise InputError(describe(str(root), "no such directory", fix))
    tables = root / version
    if not tables.is_dir():
        found = sorted(p.name for p in root.glob("v1.0-*") if p.is_dir())
        raise InputError(describe(
            str(tables), f"no {version} tables under the root (found: {', '.join(found) or 'none'})",
            "check --version, or download the tables into the root",
        ))
    try:
        paths = create_infos(root, version, out_dir)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(describe(
            str(_first_broken_table(tables)), "is not valid JSON (truncated or damaged)",
            "download or extract the nuScenes tables again",
        )) from None
    for split, path in paths.items():
        logger.info("%s infos: %s", split, path)
    return paths


def _first_broken_table(tables: Path) -> Path:
    """The first ``*.json`` table under ``tables`` that does not parse (the devkit does not say which)."""
    for table in sorted(tables.glob("*.json")):
        try:
            json.loads(table.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return table
    return tables
