"""StreamPETR as a config-driven plugin: ``load_recipe`` validates a recipe, ``build_model`` builds it.

Heavy modules (torch models, data) are imported on first use, so ``import streampetr_plugin`` is
cheap and never imports accelerator packages (torch_npu, mindspeed, mindspeed_mm).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

from streampetr_plugin.hookspecs import hookimpl

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from streampetr_plugin.config.schema import Recipe


def load_recipe(path_or_name: "Union[str, Path]", overrides: Sequence[str] = ()) -> "Recipe":
    """Load and validate a recipe file or shipped recipe name, applying ``a.b=value`` overrides."""
    from streampetr_plugin.config.loader import load_recipe as _load

    return _load(path_or_name, overrides)


def build_model(recipe: "Recipe") -> "nn.Module":
    """Build the detector of a validated recipe (plugins loaded, on CPU)."""
    from streampetr_plugin.models.build import build_model as _build

    return _build(recipe)


__all__ = ["__version__", "build_model", "hookimpl", "load_recipe"]
