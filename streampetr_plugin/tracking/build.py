"""The recipe's tracker, built from the ``trackers`` registry."""
from __future__ import annotations

from typing import Any

from streampetr_plugin.plugins import Registries
from streampetr_plugin.tracking.frame import Tracker


def build_tracker(recipe: Any, registries: Registries) -> Tracker:
    """The tracker the recipe's ``tracking`` section names (``type``), with its options."""
    return registries.trackers.build(recipe.tracking.type, recipe.tracking.arguments)
