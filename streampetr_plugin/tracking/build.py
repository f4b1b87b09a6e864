"""The recipe's tracker, built from the ``trackers`` registry."""
from __future__ import annotations

from typing import Any

from streampetr_plugin.tracking.frame import Tracker


def build_tracker(recipe: Any) -> Tracker:
    """The tracker the recipe's ``tracking`` section names (``type``), with its options."""
    from streampetr_plugin.plugins import get_registries

    return get_registries().trackers.build(recipe.tracking.type, recipe.tracking.options())
