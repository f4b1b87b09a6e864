"""The plugin host of a program: the built-in plugin plus the installed ones.

Created once at each entry point (the command line, ``streampetr-run``, the MindSpeed-MM entry, the
benchmark, the public ``load_recipe`` / ``build_model`` when called without one) and handed down to
everything that builds components or calls hooks.
"""
from __future__ import annotations

from streampetr_plugin import builtin
from streampetr_plugin.plugins import PluginHost


def create_plugin_host(*, entry_points: bool = True) -> PluginHost:
    """A loaded host: the built-in plugin and, unless ``entry_points`` is false, every installed plugin
    of the ``streampetr`` entry-point group (see :mod:`streampetr_plugin.plugins` for the switches)."""
    host = PluginHost()
    host.load(builtin, entry_points=entry_points)
    return host
