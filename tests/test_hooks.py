"""Hooks: one typed method per hook; an exception inside a plugin's implementation names the plugin."""
import pytest

from streampetr_plugin import hookimpl
from streampetr_plugin.errors import InputError
from streampetr_plugin.hooks import PluginHookError
from streampetr_plugin.host import create_plugin_host


class Picky:
    """A plugin whose hooks fail the way a buggy plugin's would, or the way a deliberate check does."""

    @hookimpl
    def streampetr_select_accelerator(self, env):
        if env["requested"] == "npu":
            raise ZeroDivisionError("no NPU here")
        return "cpu" if env["requested"] == "cuda" else None

    @hookimpl
    def streampetr_configure(self, recipe):
        raise InputError("recipe.yaml: refused (a message written for the user)")


def test_a_plugin_result_comes_back_and_a_plugin_error_names_plugin_and_hook():
    host = create_plugin_host(entry_points=False)
    host.register_plugin(Picky(), name="picky")
    assert host.hooks.select_accelerator(requested="cuda", environ={}) == "cpu"
    assert host.hooks.select_accelerator(requested="auto", environ={}) is None
    with pytest.raises(PluginHookError, match=r"plugin 'picky' .*hook streampetr_select_accelerator raised "
                                              r"ZeroDivisionError: no NPU here"):
        host.hooks.select_accelerator(requested="npu", environ={})


def test_errors_written_for_the_user_pass_unchanged():
    host = create_plugin_host(entry_points=False)
    host.register_plugin(Picky(), name="picky")
    with pytest.raises(InputError, match="^recipe.yaml: refused") as raised:
        host.hooks.configure(recipe=None)
    assert not isinstance(raised.value, PluginHookError)
