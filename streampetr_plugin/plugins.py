"""Plugin discovery and the component registries.

Entry points of the ``streampetr`` group are loaded one by one: a plugin that fails to import (any
exception, ``SystemExit`` included) is reported once (distribution, entry-point name, error) and
skipped, unless ``STREAMPETR_STRICT_PLUGINS=1``. ``STREAMPETR_LOAD_PLUGINS=a,b`` loads only those
entry points (empty: none); ``STREAMPETR_DISABLE_PLUGINS=a,b`` blocks some. The built-in plugin is
always loaded. A hook implementation whose name no specification has (a misspelt hook) is an error
naming the plugin.

There is no process-wide host: the entry points of the program (the command line, the MindSpeed-MM
entry, the benchmark) create one with :func:`streampetr_plugin.host.create_plugin_host` and hand it
down. Hooks are called through :attr:`PluginHost.hooks` (:class:`~streampetr_plugin.hooks.Hooks`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Dict, List, Optional, Tuple

import pluggy

from streampetr_plugin import hookspecs
from streampetr_plugin.errors import RunError, StreamPETRError, describe
from streampetr_plugin.hooks import BUILTIN_PLUGIN_NAME, Hooks, disable_hint
from streampetr_plugin.registry import Registry
from streampetr_plugin.version import __version__

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "streampetr"

REGISTRY_KINDS = (
    "backbones",
    "necks",
    "heads",
    "detectors",
    "datasets",
    "losses",
    "optimizers",
    "lr_schedulers",
    "adapters",
    "trackers",
    "attention_backends",
)


class PluginLoadError(RunError):
    """A plugin failed to load while ``STREAMPETR_STRICT_PLUGINS=1``."""


@dataclass
class PluginFailure:
    distribution: str
    entry_point: str
    error: str


@dataclass
class PluginInfo:
    """What ``streampetr plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    hooks: List[str]
    components: Dict[str, List[str]] = field(default_factory=dict)


@dataclass
class Registries:
    """One registry per component kind."""

    backbones: Registry
    necks: Registry
    heads: Registry
    detectors: Registry
    datasets: Registry
    losses: Registry
    optimizers: Registry
    lr_schedulers: Registry
    adapters: Registry
    trackers: Registry
    attention_backends: Registry

    def kind(self, kind: str) -> Registry:
        return getattr(self, kind)


def _env_list(name: str) -> Optional[List[str]]:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _strict() -> bool:
    return os.environ.get("STREAMPETR_STRICT_PLUGINS", "").lower() in ("1", "true", "yes", "on")


class PluginHost:
    """The pluggy manager plus the registries filled from it."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: List[PluginFailure] = []
        self.distributions: Dict[str, Tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self.hooks = Hooks(self.pm, self.distributions)
        self._registries: Optional[Registries] = None

    def load(self, builtin: object, *, entry_points: bool = True) -> None:
        """Register the built-in plugin ``builtin``, then (unless ``entry_points`` is false) the installed
        entry points."""
        self.distributions[BUILTIN_PLUGIN_NAME] = ("streampetr-plugin", __version__)
        self._register(builtin, BUILTIN_PLUGIN_NAME)
        if entry_points:
            self._load_entry_points()

    def _register(self, plugin: object, name: str) -> None:
        """``pm.register`` plus the check that every hook implementation of ``plugin`` has a
        specification: a misspelt hook would otherwise never be called, silently."""
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as error:
            self.pm.unregister(name=name)
            distribution = self.distributions.get(name, ("<registered in process>",))[0]
            raise PluginLoadError(describe(
                f"plugin {name!r} from {distribution}", f"implements a hook that does not exist ({error})",
                f"name the hook as in streampetr_plugin.hookspecs; {disable_hint(name)}",
            )) from None

    def _load_entry_points(self) -> None:
        allow = _env_list("STREAMPETR_LOAD_PLUGINS")
        block = set(_env_list("STREAMPETR_DISABLE_PLUGINS") or [])
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (allow is not None and entry_point.name not in allow) or entry_point.name in block:
                continue
            if self.pm.has_plugin(entry_point.name):
                continue  # the same distribution found twice on sys.path
            dist = getattr(entry_point, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "<unknown distribution>"
            version = dist.version if dist is not None else "?"
            try:
                plugin = entry_point.load()
            except (Exception, SystemExit) as error:  # a broken plugin must not take the host down
                failure = PluginFailure(dist_name, entry_point.name, f"{type(error).__name__}: {error}")
                if _strict():
                    raise PluginLoadError(describe(
                        f"plugin {failure.entry_point!r} from {failure.distribution}",
                        f"failed to load ({failure.error})", disable_hint(failure.entry_point),
                    )) from error
                self.failures.append(failure)
                logger.warning(
                    "skipping plugin %r from %s: %s (set STREAMPETR_STRICT_PLUGINS=1 to make this an error)",
                    failure.entry_point,
                    failure.distribution,
                    failure.error,
                )
                continue
            self.distributions[entry_point.name] = (dist_name, version)
            self._register(plugin, entry_point.name)

    def register_plugin(self, plugin: object, name: str) -> None:
        """Register a plugin object directly (tests, embedding hosts); registries are rebuilt."""
        self._register(plugin, name)
        self.distributions.setdefault(name, ("<registered in process>", "?"))
        self._registries = None

    def unregister_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.distributions.pop(name, None)
        self._registries = None

    @property
    def registries(self) -> Registries:
        if self._registries is None:
            self._registries = self._fill_registries()
        return self._registries

    def _fill_registries(self) -> Registries:
        registries = Registries(**{kind: Registry(kind) for kind in REGISTRY_KINDS})
        for kind in REGISTRY_KINDS:
            registry = registries.kind(kind)
            for impl in self.hooks.registrations(kind):
                register = partial(registry.register, provider=impl.plugin_name)
                self._call_registration(impl, f"streampetr_register_{kind}", register)
        return registries

    def _call_registration(self, impl: pluggy.HookImpl, hook: str, register) -> None:
        try:
            impl.function(register=register)
        except (Exception, SystemExit) as error:
            if impl.plugin_name == BUILTIN_PLUGIN_NAME or (_strict() and isinstance(error, StreamPETRError)):
                raise
            if _strict():
                raise self.hooks.hook_error(impl.plugin_name, hook, error) from error
            failure = PluginFailure(
                self.distributions.get(impl.plugin_name, ("<unknown distribution>",))[0],
                impl.plugin_name,
                f"{type(error).__name__}: {error}",
            )
            self.failures.append(failure)
            logger.warning("plugin %r failed in %s, its components are skipped: %s",
                           impl.plugin_name, hook, failure.error)

    def infos(self) -> List[PluginInfo]:
        registries = self.registries
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            components = {
                kind: [e.name for e in registries.kind(kind).entries() if e.provider == name]
                for kind in REGISTRY_KINDS
            }
            dist, version = self.distributions.get(name, ("?", "?"))
            infos.append(
                PluginInfo(name, dist, version, hooks, {k: v for k, v in components.items() if v})
            )
        return infos

    def versions(self) -> Dict[str, str]:
        """plugin name -> version, recorded in checkpoints."""
        return {name: version for name, (_, version) in self.distributions.items()}
