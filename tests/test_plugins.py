import json
import logging
import re
import sys

import pytest
import torch

from streampetr_plugin import hookimpl
from streampetr_plugin.cli.main import main as streampetr_main
from streampetr_plugin.cli.run import main as streampetr_run
from streampetr_plugin.errors import EXIT_FAILURE
from streampetr_plugin.host import create_plugin_host
from streampetr_plugin.plugins import BUILTIN_PLUGIN_NAME, PluginLoadError
from streampetr_plugin.registry import RegistryError
from tests import trainer_helpers
from tests.plugin_helpers import TINY_BACKBONE_PLUGIN, activate, write_distribution

BROKEN_PLUGIN = "raise ImportError('needs libfoo, which is not installed')\n"


@pytest.fixture
def fresh_host(monkeypatch):
    """No plugin switches in the environment; each test creates its hosts."""
    for name in ("STREAMPETR_STRICT_PLUGINS", "STREAMPETR_LOAD_PLUGINS", "STREAMPETR_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


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
    registries = create_plugin_host().registries
    assert {"vovnet", "resnet"} <= set(registries.backbones.names())
    assert "cpfpn" in registries.necks and "streampetr" in registries.heads
    assert registries.backbones.get("vovnet").provider == BUILTIN_PLUGIN_NAME


def test_plugin_object_registered_in_process(fresh_host):
    class ExtraNeck:
        @hookimpl
        def streampetr_register_necks(self, register):
            register("identity_neck", lambda **kw: kw)

    host = create_plugin_host()
    host.register_plugin(ExtraNeck(), name="extra")
    assert host.registries.necks.get("identity_neck").provider == "extra"
    host.unregister_plugin("extra")
    assert "identity_neck" not in host.registries.necks


def test_entry_point_plugin_is_discovered_and_broken_one_reported(fresh_host, installed, caplog):
    with caplog.at_level(logging.WARNING):
        host = create_plugin_host()
    assert host.registries.backbones.get("tiny_conv").provider == "tiny"
    assert host.distributions["tiny"] == ("streampetr-tiny", "0.3.1")
    assert [(f.distribution, f.entry_point) for f in host.failures] == [("streampetr-broken", "broken")]
    assert "needs libfoo" in host.failures[0].error
    warnings = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(warnings) == 1 and "streampetr-broken" in warnings[0].getMessage()


def test_strict_mode_makes_a_broken_plugin_an_error(fresh_host, installed, monkeypatch):
    monkeypatch.setenv("STREAMPETR_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="'broken' from streampetr-broken.*needs libfoo"):
        create_plugin_host()


def test_load_allow_list_and_disable_list(fresh_host, installed, monkeypatch):
    monkeypatch.setenv("STREAMPETR_LOAD_PLUGINS", "")
    host = create_plugin_host()
    assert "tiny_conv" not in host.registries.backbones and not host.failures
    assert "vovnet" in host.registries.backbones  # the built-in plugin always loads

    monkeypatch.setenv("STREAMPETR_LOAD_PLUGINS", "tiny")
    host = create_plugin_host()
    assert "tiny_conv" in host.registries.backbones and not host.failures

    monkeypatch.delenv("STREAMPETR_LOAD_PLUGINS")
    monkeypatch.setenv("STREAMPETR_DISABLE_PLUGINS", "broken,tiny")
    host = create_plugin_host()
    assert "tiny_conv" not in host.registries.backbones and not host.failures


class Clash:
    @hookimpl
    def streampetr_register_backbones(self, register):
        register("vovnet", lambda **kw: None)


def test_duplicate_component_from_a_plugin_names_both_providers(fresh_host):
    host = create_plugin_host()
    host.register_plugin(Clash(), name="clash")
    # reported and skipped: the built-in vovnet stays, the CLI keeps working
    assert host.registries.backbones.get("vovnet").provider == BUILTIN_PLUGIN_NAME
    (failure,) = host.failures
    assert failure.entry_point == "clash"
    assert re.search(f"'vovnet' is registered twice, by plugin '{BUILTIN_PLUGIN_NAME}' and by plugin 'clash'",
                     failure.error)


def test_duplicate_component_is_an_error_in_strict_mode(fresh_host, monkeypatch):
    monkeypatch.setenv("STREAMPETR_STRICT_PLUGINS", "1")
    host = create_plugin_host()
    host.register_plugin(Clash(), name="clash")
    with pytest.raises(RegistryError, match=f"{BUILTIN_PLUGIN_NAME}.*clash"):
        host.registries.backbones.get("vovnet")


def test_failing_registration_hook_of_a_third_party_is_skipped(fresh_host):
    class Faulty:
        @hookimpl
        def streampetr_register_heads(self, register):
            raise RuntimeError("boom")

    host = create_plugin_host()
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


# ------------------------------------------------------------------ plugins that exit or raise

EXITING_PLUGIN = "import sys\nsys.exit('exiting_plugin: giving up at import')\n"


@pytest.fixture
def exiting(tmp_path, monkeypatch):
    """A distribution whose plugin module calls sys.exit() when imported."""
    write_distribution(tmp_path / "exiting", "streampetr-exiting", {"exiting": "exiting_plugin"},
                       {"exiting_plugin.py": EXITING_PLUGIN})
    activate(tmp_path / "exiting", monkeypatch)


@pytest.fixture
def standin(fresh_host):
    """A host with the trainer tests' stand-in components, registered once the entry points are loaded."""
    threads = torch.get_num_threads()
    yield trainer_helpers.standin_host()
    torch.set_num_threads(threads)


def test_plugin_exiting_at_import_does_not_stop_the_commands(fresh_host, exiting, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        assert streampetr_main(["plugins"]) == 0
    listed = capsys.readouterr().out
    assert "FAILED exiting (streampetr-exiting): SystemExit: exiting_plugin: giving up" in listed
    assert any("skipping plugin 'exiting' from streampetr-exiting" in r.getMessage() for r in caplog.records)
    assert streampetr_main(["validate", "demo_cpu"]) == 0


def test_plugin_exiting_at_import_does_not_stop_training(fresh_host, exiting, standin, tmp_path):
    recipe = trainer_helpers.write_recipe(tmp_path)
    assert standin.failures[0].entry_point == "exiting"
    assert streampetr_run([str(recipe), f"runtime.work_dir={tmp_path / 'run'}", "runtime.max_iters=2"],
                          standin) == 0
    assert (tmp_path / "run" / "checkpoints" / "iter_00000002.pth").is_file()


def test_strict_mode_refuses_a_plugin_that_exits_by_name(fresh_host, exiting, monkeypatch, capsys):
    monkeypatch.setenv("STREAMPETR_STRICT_PLUGINS", "1")
    assert streampetr_main(["plugins"]) == EXIT_FAILURE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: plugin 'exiting' from streampetr-exiting: failed to load (SystemExit: ")
    assert "STREAMPETR_DISABLE_PLUGINS=exiting" in line


class RaisingHooks:
    """Hooks that fail at call time, as a buggy plugin's would."""

    @hookimpl
    def streampetr_configure(self, recipe):
        if recipe.description == "break configure":
            raise KeyError("missing_option")

    @hookimpl
    def streampetr_pre_train(self, context):
        raise RuntimeError("pre-train check failed")


def test_hook_raising_at_call_time_is_reported_with_plugin_and_hook(standin, tmp_path, capsys):
    standin.register_plugin(RaisingHooks(), name="raising")
    recipe = trainer_helpers.write_recipe(tmp_path)
    validate = ["validate", str(recipe), "description='break configure'"]
    assert streampetr_main(validate, standin) == EXIT_FAILURE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: plugin 'raising' from <registered in process>: hook streampetr_configure "
                           "raised KeyError: 'missing_option' (")
    run = [str(recipe), f"runtime.work_dir={tmp_path / 'run'}", "runtime.max_iters=2"]
    assert streampetr_run(run, standin) == EXIT_FAILURE
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert lines == ["error: plugin 'raising' from <registered in process>: hook streampetr_pre_train raised "
                     "RuntimeError: pre-train check failed (fix or update the plugin, or leave it out with "
                     "STREAMPETR_DISABLE_PLUGINS=raising)"]


def test_registration_hook_exiting_is_skipped(fresh_host):
    class Exiting:
        @hookimpl
        def streampetr_register_necks(self, register):
            sys.exit(3)

    host = create_plugin_host()
    host.register_plugin(Exiting(), name="exits")
    assert "cpfpn" in host.registries.necks
    assert host.failures[-1].entry_point == "exits" and host.failures[-1].error == "SystemExit: 3"


class MisspeltHook:
    @hookimpl
    def streampetr_register_backbone(self, register):  # the hook is streampetr_register_backbones
        register("never_seen", lambda: None)


def test_misspelt_hook_implementation_is_an_error_naming_the_plugin(fresh_host):
    host = create_plugin_host(entry_points=False)
    with pytest.raises(PluginLoadError, match=r"plugin 'typo' .*streampetr_register_backbone") as raised:
        host.register_plugin(MisspeltHook(), name="typo")
    assert "STREAMPETR_DISABLE_PLUGINS=typo" in str(raised.value)
    assert not host.pm.has_plugin("typo") and "never_seen" not in host.registries.backbones


def test_misspelt_hook_of_an_installed_plugin_stops_loading(fresh_host, tmp_path, monkeypatch):
    write_distribution(tmp_path / "typo", "streampetr-typo", {"typo": "typo_plugin"}, {"typo_plugin.py": (
        "from streampetr_plugin import hookimpl\n\n@hookimpl\ndef streampetr_configur(recipe):\n    pass\n"
    )})
    activate(tmp_path / "typo", monkeypatch)
    with pytest.raises(PluginLoadError, match="plugin 'typo' from streampetr-typo.*streampetr_configur"):
        create_plugin_host()
