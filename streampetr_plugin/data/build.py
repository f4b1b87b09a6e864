"""Datasets of a recipe, built through the ``datasets`` registry."""
from __future__ import annotations

from torch.utils.data import Dataset

from streampetr_plugin.config.schema import Recipe
from streampetr_plugin.plugins import Registries


def build_dataset(recipe: Recipe, registries: Registries, *, training: bool) -> Dataset:
    """``data.train`` (training pipeline, labels) or ``data.val`` (test pipeline) of ``recipe``.

    The recipe's ``data.class_names`` is the one source of the label order, shared with the model.
    """
    spec = recipe.data.train if training else recipe.data.val
    return registries.datasets.build(
        spec.type, spec.arguments, training=training, classes=list(recipe.data.class_names)
    )
