"""Typed calls of the ``streampetr`` hooks: one method per hook, so no caller spells ``pm.hook.<name>``.

An exception raised inside a plugin's implementation (``SystemExit`` included) becomes a
:class:`PluginHookError` naming the plugin and the hook; errors written for the user
(:class:`StreamPETRError`) and the built-in plugin's own errors pass unchanged.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import pluggy

from streampetr_plugin.errors import RunError, StreamPETRError, describe

if TYPE_CHECKING:
    from torch import nn

BUILTIN_PLUGIN_NAME = "streampetr-builtin"


class PluginHookError(RunError):
    """A plugin's hook implementation raised; the message names the plugin and the hook."""


def disable_hint(plugin: str) -> str:
    return f"fix or update the plugin, or leave it out with STREAMPETR_DISABLE_PLUGINS={plugin}"


def _raising_plugin(caller: pluggy.HookCaller, error: BaseException) -> Optional[str]:
    """The plugin whose implementation of ``caller``'s hook ``error`` was raised in (None: not in one)."""
    plugins = {}
    for impl in caller.get_hookimpls():
        function = inspect.unwrap(getattr(impl.function, "__func__", impl.function))
        code = getattr(function, "__code__", None)
        if code is not None:
            plugins[code] = impl.plugin_name
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code in plugins:
            return plugins[frame.tb_frame.f_code]
        frame = frame.tb_next
    return None


class Hooks:
    """The hooks of one plugin manager.

    Args:
        pm: the plugin manager holding the specifications of :mod:`streampetr_plugin.hookspecs`.
        distributions: plugin name -> (distribution, version), for the error messages.
    """

    def __init__(self, pm: pluggy.PluginManager, distributions: Mapping[str, Tuple[str, str]]) -> None:
        self._pm = pm
        self._distributions = distributions

    def hook_error(self, plugin: str, hook: str, error: BaseException) -> PluginHookError:
        distribution = self._distributions.get(plugin, ("<unknown distribution>",))[0]
        return PluginHookError(describe(
            f"plugin {plugin!r} from {distribution}", f"hook {hook} raised {type(error).__name__}: {error}",
            disable_hint(plugin),
        ))

    def _call(self, hook: str, **kwargs: Any) -> Any:
        caller = getattr(self._pm.hook, hook)
        try:
            return caller(**kwargs)
        except StreamPETRError:
            raise
        except (Exception, SystemExit) as error:
            plugin = _raising_plugin(caller, error)
            if plugin is None or plugin == BUILTIN_PLUGIN_NAME:
                raise
            raise self.hook_error(plugin, hook, error) from error

    def registrations(self, kind: str) -> List[pluggy.HookImpl]:
        """The implementations of ``streampetr_register_<kind>``, in registration order (the built-in
        plugin first); the host calls each on its own so that one failing plugin can be skipped."""
        return list(getattr(self._pm.hook, f"streampetr_register_{kind}").get_hookimpls())

    def configure(self, *, recipe: Any) -> None:
        self._call("streampetr_configure", recipe=recipe)

    def post_model_build(self, *, model: "nn.Module", recipe: Any) -> None:
        self._call("streampetr_post_model_build", model=model, recipe=recipe)

    def pre_train(self, *, context: Any) -> None:
        self._call("streampetr_pre_train", context=context)

    def post_train(self, *, context: Any) -> None:
        self._call("streampetr_post_train", context=context)

    def select_accelerator(self, *, requested: str, environ: Dict[str, str]) -> Optional[str]:
        """The device kind a plugin insists on, or None."""
        return self._call("streampetr_select_accelerator", env={"requested": requested, "environ": environ})

