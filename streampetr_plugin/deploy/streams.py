"""A split of the recipe's data as one-stream batches in stream order: what ``streampetr infer`` runs and
``streampetr export`` checks parity on."""
from __future__ import annotations

from typing import Any, Dict, Iterator

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.deploy.options import SPLITS
from streampetr_plugin.errors import InputError, describe
from streampetr_plugin.plugins import Registries


def split_dataset(recipe: Recipe, registries: Registries, split: str) -> Any:
    """The recipe's val dataset (test pipeline) over the ``val`` or the ``train`` split's samples."""
    from streampetr_plugin.data.build import build_dataset

    if split not in SPLITS:
        raise InputError(describe("--split", f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}"))
    if split == "train":
        recipe = recipe.model_copy(deep=True)
        val = recipe.data.val
        # the test-time pipeline over the training samples
        val.use_params(val.params.model_copy(update={"val_info": recipe.data.train.params.train_info}))
    return build_dataset(recipe, registries, training=False)


def stream_batches(
    recipe: Recipe, registries: Registries, *, split: str = "val", dataset: Any = None
) -> Iterator[Dict[str, Any]]:
    """One-stream batches (batch contract, B = 1) of every frame of ``split`` in stream order."""
    from streampetr_plugin.data.loader import build_dataloader

    dataset = split_dataset(recipe, registries, split) if dataset is None else dataset
    yield from build_dataloader(
        dataset,
        batch_size=1,
        num_workers=recipe.data.num_workers,
        rank=0,
        world_size=1,
        seed=recipe.runtime.seed,
        training=False,
    )
