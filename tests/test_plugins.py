import json
import logging
import re

import pytest

from streampetr_plugin import hookimpl
from streampetr_plugin.cli.main import main as streampetr_main
from streampetr_plugin.plugins import BUILTIN_PLUGIN_NAME, PluginLoadError, get_plugin_host, reset_plugin_host
from streampetr_plugin.registry import RegistryError
from tests.plugin_helpers import TINY_BACKBONE_PLUGIN, activate, write_distribution

BROKEN_PLUGIN = "raise ImportError('needs libfoo, which is not installed')\n"


@pytest.fixture
def fresh_host(monkeypatch):
    for name in ("STREAMPETR_STRICT_PLUGINS", "STREAMPETR_LOAD_PLUGINS", "STREAMPETR_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    reset_plugin_host()
    yield
    reset_plugin_host()


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Two throwaway distributions on sys.path: a working backbone plugin and a broken one."""
    write_distribution(tmp_path / "good", "streampetr-tiny", {"tiny": "tiny_plugin"},
                       {"tiny_plugin.py": TINY_BACKBONE_PLUGIN})
    write_distribution(tmp_path / "bad", "streampetr-broken", {"broken": "broken_plugin"},
                       {"broken_plugin.py": BROKEN_PLUGIN})
    activate(tmp_path / "good", monkeypatch)
    activate(tmp_path / "bad", monkeypatch)


def test_builtin_plugin_registers_streampetr_components(fresh_host):
    registries = get_plugin_host().registries
    assert {"vovnet", "resnet"} <= set(registries.backbones.names())
    assert "cpfpn" in registries.necks and "streampetr" in registries.heads
    assert registries.backbones.get("vovnet").provider == BUILTIN_PLUGIN_NAME


def test_plugin_object_registered_in_process(fresh_host):
    class ExtraNeck:
        @hookimpl
        def streampetr_register_necks(self, register):
            register("identity_neck", lambda **kw: kw)

    host = get_plugin_host()
    host.register_plugin(ExtraNeck(), name="extra")
    assert host.registries.necks.get("identity_neck").provider == "extra"
    host.unregister_plugin("extra")
    assert "identity_neck" not in host.registries.necks


def test_entry_point_plugin_is_discovered_and_broken_one_reported(fresh_host, installed, caplog):
    with caplog.at_level(logging.WARNING):
        host = get_plugin_host()
        get_plugin_host()  # loading again in the same process is harmless
    assert host.registries.backbones.get("tiny_conv").provider == "tiny"
    assert host.distributions["tiny"] == ("streampetr-tiny", "0.3.1")
    assert [(f.distribution, f.entry_point) for f in host.failures] == [("streampetr-broken", "broken")]
    assert "needs libfoo" in host.failures[0].error
    warnings = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(warnings) == 1 and "streampetr-broken" in warnings[0].getMessage()


def test_strict_mode_makes_a_broken_plugin_an_error(fresh_host, installed, monkeypatch):
    monkeypatch.setenv("STREAMPETR_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="'broken' from streampetr-broken.*needs libfoo"):
        get_plugin_host()


def test_load_allow_list_and_disable_list(fresh_host, installed, monkeypatch):
    monkeypatch.setenv("STREAMPETR_LOAD_PLUGINS", "")
    host = get_plugin_host()
    assert "tiny_conv" not in host.registries.backbones and not host.failures
    assert "vovnet" in host.registries.backbones  # the built-in plugin always loads

    reset_plugin_host()
    monkeypatch.setenv("STREAMPETR_LOAD_PLUGINS", "tiny")
    host = get_plugin_host()
    assert "tiny_conv" in host.registries.backbones and not host.failures

    reset_plugin_host()
    monkeypatch.delenv("STREAMPETR_LOAD_PLUGINS")
    monkeypatch.setenv("STREAMPETR_DISABLE_PLUGINS", "broken,tiny")
    host = get_plugin_host()
    assert "tiny_conv" not in host.registries.backbones and not host.failures


class Clash:
    @hookimpl
    def streampetr_register_backbones(self, register):
        register("vovnet", lambda **kw: None)


def test_duplicate_component_from_a_plugin_names_both_providers(fresh_host):
    host = get_plugin_host()
    host.register_plugin(Clash(), name="clash")
    # reported and skipped: the built-in vovnet stays, the CLI keeps working
    assert host.registries.backbones.get("vovnet").provider == BUILTIN_PLUGIN_NAME
    (failure,) = host.failures
    assert failure.entry_point == "clash"
    assert re.search(f"'vovnet' is registered twice, by plugin '{BUILTIN_PLUGIN_NAME}' and by plugin 'clash'",
                     failure.error)


def test_duplicate_component_is_an_error_in_strict_mode(fresh_host, monkeypatch):
    monkeypatch.setenv("STREAMPETR_STRICT_PLUGINS", "1")
    host = get_plugin_host()
    host.register_plugin(Clash(), name="clash")
    with pytest.raises(RegistryError, match=f"{BUILTIN_PLUGIN_NAME}.*clash"):
        host.registries.backbones.get("vovnet")


def test_failing_registration_hook_of_a_third_party_is_skipped(fresh_host):
    class Faulty:
        @hookimpl
        def streampetr_register_heads(self, register):
            raise RuntimeError("boom")

    host = get_plugin_host()
    host.register_plugin(Faulty(), name="faulty")
    assert "streampetr" in host.registries.heads
    assert host.failures[-1].entry_point == "faulty" and "boom" in host.failures[-1].error


def test_plugins_command_lists_builtin_and_installed(fresh_host, installed, capsys):
    assert streampetr_main(["plugins", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    by_name = {p["name"]: p for p in payload["plugins"]}
    assert by_name["tiny"]["version"] == "0.3.1"
    assert by_name["tiny"]["components"] == {"backbones": ["tiny_conv"]}
    assert "streampetr_register_backbones" in by_name[BUILTIN_PLUGIN_NAME]["hooks"]
    assert payload["failures"][0]["entry_point"] == "broken"
