"""StreamPETR as a config-driven plugin: ``load_recipe`` validates a recipe, ``build_model`` builds it.

Heavy modules (torch models, data) are imported on first use, so ``import streampetr_plugin`` is
cheap and never imports accelerator packages (torch_npu, mindspeed, mindspeed_mm).

Both functions take the plugin host whose components they use (``streampetr_plugin.host.
create_plugin_host()``); without one, each call creates its own (the built-in plugin plus the installed
entry points), so plugins registered in-process on another host are not seen.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

from streampetr_plugin.hookspecs import hookimpl
from streampetr_plugin.version import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from streampetr_plugin.config.schema import Recipe
    from streampetr_plugin.plugins import PluginHost


def _host_or_new(host: "Optional[PluginHost]") -> "PluginHost":
    from streampetr_plugin.host import create_plugin_host

    return host if host is not None else create_plugin_host()


def load_recipe(
    path_or_name: "Union[str, Path]", overrides: Sequence[str] = (), host: "Optional[PluginHost]" = None
) -> "Recipe":
    """Load and validate a recipe file or shipped recipe name, applying ``a.b=value`` overrides."""
    from streampetr_plugin.config.loader import load_recipe as _load

    return _load(path_or_name, overrides, host=_host_or_new(host))


def build_model(recipe: "Recipe", host: "Optional[PluginHost]" = None) -> "nn.Module":
    """Build the detector of a validated recipe (on CPU) and run the ``streampetr_post_model_build`` hook."""
    from streampetr_plugin.models.build import build_model as _build

    host = _host_or_new(host)
    model = _build(recipe, host.registries)
    host.hooks.post_model_build(model=model, recipe=recipe)
    return model


__all__ = ["__version__", "build_model", "hookimpl", "load_recipe"]
