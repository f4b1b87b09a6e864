"""Plugin discovery and the component registries.

Entry points of the ``streampetr`` group are loaded one by one: a plugin that fails to import (any
exception, ``SystemExit`` included) is reported once (distribution, entry-point name, error) and
skipped, unless ``STREAMPETR_STRICT_PLUGINS=1``. ``STREAMPETR_LOAD_PLUGINS=a,b`` loads only those
entry points (empty: none); ``STREAMPETR_DISABLE_PLUGINS=a,b`` blocks some. The built-in plugin is
always loaded. Loading is idempotent within a process (every distributed rank loads plugins once).

Hooks are called through :meth:`PluginHost.call_hook`: an exception inside a plugin's implementation
becomes a :class:`PluginHookError` naming the plugin and the hook.
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any, Dict, List, Optional

import pluggy

from streampetr_plugin import hookspecs
from streampetr_plugin.errors import RunError, StreamPETRError, describe
from streampetr_plugin.registry import Registry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "streampetr"
BUILTIN_PLUGIN_NAME = "streampetr-builtin"

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
)


class PluginLoadError(RunError):
    """A plugin failed to load while ``STREAMPETR_STRICT_PLUGINS=1``."""


class PluginHookError(RunError):
    """A plugin's hook implementation raised; the message names the plugin and the hook."""


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

    def kind(self, kind: str) -> Registry:
        return getattr(self, kind)


def _env_list(name: str) -> Optional[List[str]]:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _strict() -> bool:
    return os.environ.get("STREAMPETR_STRICT_PLUGINS", "").lower() in ("1", "true", "yes", "on")


def _disable_hint(plugin: str) -> str:
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


class PluginHost:
    """The pluggy manager plus the registries filled from it."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: List[PluginFailure] = []
        self.distributions: Dict[str, tuple] = {}  # plugin name -> (distribution, version)
        self._registries: Optional[Registries] = None

    def load(self) -> None:
        from streampetr_plugin import __version__, builtin

        self.pm.register(builtin, name=BUILTIN_PLUGIN_NAME)
        self.distributions[BUILTIN_PLUGIN_NAME] = ("streampetr-plugin", __version__)
        self._load_entry_points()

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
                self.pm.register(plugin, name=entry_point.name)
            except (Exception, SystemExit) as error:  # a broken plugin must not take the host down
                failure = PluginFailure(dist_name, entry_point.name, f"{type(error).__name__}: {error}")
                if _strict():
                    raise PluginLoadError(describe(
                        f"plugin {failure.entry_point!r} from {failure.distribution}",
                        f"failed to load ({failure.error})", _disable_hint(failure.entry_point),
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

    def register_plugin(self, plugin: object, name: str) -> None:
        """Register a plugin object directly (tests, embedding hosts); registries are rebuilt."""
        self.pm.register(plugin, name=name)
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
            caller = getattr(self.pm.hook, f"streampetr_register_{kind}")
            registry = registries.kind(kind)
            for impl in caller.get_hookimpls():  # in plugin registration order: the built-in plugin first
                register = partial(registry.register, provider=impl.plugin_name)
                self._call_registration(impl, caller.name, register)
        return registries

    def _call_registration(self, impl: pluggy.HookImpl, hook: str, register) -> None:
        try:
            impl.function(register=register)
        except (Exception, SystemExit) as error:
            if impl.plugin_name == BUILTIN_PLUGIN_NAME or (_strict() and isinstance(error, StreamPETRError)):
                raise
            if _strict():
                raise self._hook_error(impl.plugin_name, hook, error) from error
            failure = PluginFailure(
                self.distributions.get(impl.plugin_name, ("<unknown distribution>",))[0],
                impl.plugin_name,
                f"{type(error).__name__}: {error}",
            )
            self.failures.append(failure)
            logger.warning("plugin %r failed in %s, its components are skipped: %s",
                           impl.plugin_name, hook, failure.error)

    def _hook_error(self, plugin: str, hook: str, error: BaseException) -> PluginHookError:
        distribution = self.distributions.get(plugin, ("<unknown distribution>",))[0]
        return PluginHookError(describe(
            f"plugin {plugin!r} from {distribution}", f"hook {hook} raised {type(error).__name__}: {error}",
            _disable_hint(plugin),
        ))

    def call_hook(self, hook: str, **kwargs: Any) -> Any:
        """``pm.hook.<hook>(**kwargs)``. An exception raised inside a plugin's implementation (``SystemExit``
        included) becomes :class:`PluginHookError` naming the plugin and the hook; errors written for the
        user (:class:`StreamPETRError`) and the built-in plugin's own errors pass unchanged."""
        caller = getattr(self.pm.hook, hook)
        try:
            return caller(**kwargs)
        except StreamPETRError:
            raise
        except (Exception, SystemExit) as error:
            plugin = _raising_plugin(caller, error)
            if plugin is None or plugin == BUILTIN_PLUGIN_NAME:
                raise
            raise self._hook_error(plugin, hook, error) from error

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


_host: Optional[PluginHost] = None
_lock = threading.Lock()


def get_plugin_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _host
    with _lock:
        if _host is None:
            host = PluginHost()
            host.load()
            _host = host
        return _host


def reset_plugin_host() -> None:
    """Forget loaded plugins (tests, or after changing the environment switches)."""
    global _host
    with _lock:
        _host = None


def get_registries() -> Registries:
    return get_plugin_host().registries
