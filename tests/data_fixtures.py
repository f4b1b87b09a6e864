"""Session-wide tiny synthetic nuScenes dataset (generated once per test process).

Import the fixtures in ``conftest.py``: ``from data_fixtures import synthetic_nuscenes, synthetic_nusc,
synthetic_params``.
The module-level cache keeps it at one generation per process even if several modules import them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import pytest

from streampetr_plugin.data.dataset import NuScenesDatasetParams, NuScenesStreamDataset
from streampetr_plugin.data.infos import create_infos
from streampetr_plugin.data.synthetic import SyntheticDataset, make_synthetic

TINY_IMAGE_SIZE: Tuple[int, int] = (200, 112)  # (width, height): 1600 x 900 / 8
TINY_FINAL_DIM: Tuple[int, int] = (64, 160)  # (height, width) network input
_CACHE: Dict[str, "SyntheticNuScenes"] = {}


@dataclass(frozen=True)
class SyntheticNuScenes:
    """The generated dataset and its info files."""

    dataset: SyntheticDataset
    root: Path
    version: str
    train_info: Path
    val_info: Path


@pytest.fixture(scope="session")
def synthetic_nuscenes(tmp_path_factory: pytest.TempPathFactory) -> SyntheticNuScenes:
    """3 scenes (2 mini_train, 1 mini_val) x 4 key frames, 200 x 112 images, with infos built."""
    if "tiny" not in _CACHE:
        root = tmp_path_factory.mktemp("synthetic_nuscenes")
        dataset = make_synthetic(root, num_scenes=3, samples_per_scene=4, objects_per_scene=16,
                                 image_size=TINY_IMAGE_SIZE, seed=0)
        paths = create_infos(root, dataset.version)
        _CACHE["tiny"] = SyntheticNuScenes(dataset=dataset, root=root, version=dataset.version,
                                           train_info=paths["train"], val_info=paths["val"])
    return _CACHE["tiny"]


@pytest.fixture(scope="session")
def synthetic_params(synthetic_nuscenes: SyntheticNuScenes) -> NuScenesDatasetParams:
    """Dataset parameters for the tiny synthetic data (64 x 160 input, resize around 1)."""
    return NuScenesDatasetParams(
        root=str(synthetic_nuscenes.root), version=synthetic_nuscenes.version, final_dim=TINY_FINAL_DIM,
        resize_lim=(0.9, 1.1),
    )


@pytest.fixture(scope="session")
def synthetic_nusc(synthetic_nuscenes: SyntheticNuScenes):
    """The tiny synthetic nuScenes loaded by nuscenes-devkit (``nuscenes.NuScenes``)."""
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=synthetic_nuscenes.version, dataroot=str(synthetic_nuscenes.root), verbose=False)


def nuscenes_dataset(params: NuScenesDatasetParams, *, split: str) -> NuScenesStreamDataset:
    """The dataset of ``split`` ("train": training pipeline with labels; "val": test pipeline), built from
    its params as the registry builds it."""
    return NuScenesStreamDataset(training=split == "train", **dict(params))
