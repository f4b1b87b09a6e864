"""Accelerator adapters: named optimisations that report what they did.

An adapter is one optimisation for one or more device kinds (an environment variable set, a fused
kernel injected, a runtime flag). It declares

* ``name``: its key in the recipe (``accelerator.adapters.<name>: {enabled, ...options}``) and in the
  ``adapters`` registry;
* ``devices``: the device kinds it is meant for (``"npu"``, ``"cuda"``, ``"cpu"``);
* ``phase``: when the trainer runs it (:class:`Phase`);
* ``conflicts``: names of adapters that must not be applied together with it (the one that ran first
  wins, the other is skipped with a reason);
* ``enabled_by_default``: whether it runs when the recipe does not mention it.

``precheck(context) -> (ok, reason)`` says whether it can apply here; ``apply(context) ->
AdapterResult`` does it and says ``APPLIED`` / ``SKIPPED`` / ``FAILED`` with a reason. Adapters do not
patch globals: where we own the call site they write into the :class:`AdapterContext` (optimizer class,
DDP options, attention backend names on the model's modules) and the trainer uses what they wrote.

:class:`AdapterRunner` builds every registered adapter with the recipe's options, keeps those for the
selected device, runs them phase by phase, and formats the one summary table the trainer logs.
"""
from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Dict,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Sequence,
    Tuple,
)


if TYPE_CHECKING:
    from torch import nn

    from streampetr_plugin.config.schema import Recipe
    from streampetr_plugin.plugins import Registries

logger = logging.getLogger(__name__)

DEVICE_KINDS: Tuple[str, ...] = ("npu", "cuda", "cpu")


class Phase(str, enum.Enum):
    """When an adapter runs, in this order."""

    ENVIRONMENT = "environment"  # before the device runtime is imported or allocates anything
    RUNTIME = "runtime"  # device runtime imported; before the process group and the model exist
    MODEL = "model"  # model built and on its device, before the DDP wrapper
    OPTIMIZER = "optimizer"  # model wrapped, before the optimiser is built
    # Evaluation, inference and export only (never in training): model in eval mode with its weights.
    INFERENCE = "inference"


PHASES: Tuple[Phase, ...] = tuple(Phase)


class Status(str, enum.Enum):
    APPLIED = "APPLIED"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class AdapterResult:
    """What an adapter did and why."""

    status: Status
    reason: str

    @classmethod
    def applied(cls, reason: str) -> "AdapterResult":
        return cls(Status.APPLIED, reason)

    @classmethod
    def skipped(cls, reason: str) -> "AdapterResult":
        return cls(Status.SKIPPED, reason)

    @classmethod
    def failed(cls, reason: str) -> "AdapterResult":
        return cls(Status.FAILED, reason)


@dataclass
class AdapterContext:
    """What adapters read and write. The trainer fills the inputs and uses the outputs.

    Inputs: ``device`` (selected kind), ``environ`` (the process environment), ranks, the ``recipe``,
    the component ``registries`` (an adapter may select a registered kernel), from the MODEL phase
    on, ``model`` (unwrapped, on its device), and ``exporting`` (the model is built for an export, which
    traces it: nothing may replace its modules' eager forward).
    Outputs: ``ddp_options`` (extra ``DistributedDataParallel`` keyword arguments),
    ``optimizer_class`` (passed to the optimiser factory as ``optimizer_class``) and
    ``optimizer_options`` (override the recipe's optimiser options, e.g. ``implementation``).
    """

    device: str
    environ: MutableMapping[str, str] = field(default_factory=lambda: os.environ)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    recipe: Optional["Recipe"] = None
    registries: Optional["Registries"] = None
    model: Optional["nn.Module"] = None
    exporting: bool = False
    ddp_options: Dict[str, Any] = field(default_factory=dict)
    optimizer_class: Optional[type] = None
    optimizer_options: Dict[str, Any] = field(default_factory=dict)

    def optimizer_choice(self) -> Tuple[Optional[str], Optional[str]]:
        """(registered optimiser name, its ``implementation`` option) from the recipe, or Nones."""
        if self.recipe is None:
            return None, None
        spec = self.recipe.optimization.optimizer
        implementation = self.optimizer_options.get("implementation", spec.options().get("implementation"))
        return spec.type, implementation

    def adamw_left_to_adapters(self) -> Tuple[bool, str]:
        """The precheck of every optimiser adapter: the recipe uses ``adamw`` with
        ``implementation: auto``, i.e. it leaves the kernel choice to the adapters."""
        optimizer, implementation = self.optimizer_choice()
        if optimizer != "adamw":
            return False, f"the recipe's optimizer is {optimizer!r}, not adamw"
        if implementation not in (None, "auto"):
            return False, f"the recipe asks for optimizer.implementation={implementation}"
        return True, ""


class Adapter:
    """Base class of the built-in adapters (a plugin may supply any object with these attributes)."""

    name: ClassVar[str] = ""
    devices: ClassVar[Tuple[str, ...]] = DEVICE_KINDS
    phase: ClassVar[Phase] = Phase.MODEL
    conflicts: ClassVar[Tuple[str, ...]] = ()
    enabled_by_default: ClassVar[bool] = True
    priority: ClassVar[int] = 100  # order inside a phase: lower first, then by name

    def precheck(self, context: AdapterContext) -> Tuple[bool, str]:
        """(True, "") when the adapter can apply here, else (False, why not)."""
        return True, ""

    def apply(self, context: AdapterContext) -> AdapterResult:
        raise NotImplementedError


@dataclass(frozen=True)
class AdapterRecord:
    """One line of the summary table."""

    name: str
    phase: Phase
    status: Status
    reason: str


def _phase_of(adapter: Any) -> Phase:
    return Phase(getattr(adapter, "phase", Phase.MODEL))


class AdapterRunner:
    """Runs the adapters meant for ``device``, phase by phase, and records the outcome of each.

    Args:
        adapters: built adapter objects (any device; others are left out).
        device: the selected device kind.
        enabled: adapter name -> the recipe's ``enabled`` switch (absent: the adapter's default).
    """

    def __init__(
        self, adapters: Sequence[Any], *, device: str, enabled: Optional[Mapping[str, bool]] = None
    ) -> None:
        self.device = device
        self._enabled = dict(enabled or {})
        mine = [a for a in adapters if device in getattr(a, "devices", DEVICE_KINDS)]
        self._adapters = sorted(
            mine, key=lambda a: (PHASES.index(_phase_of(a)), getattr(a, "priority", 100), a.name)
        )
        self.records: List[AdapterRecord] = []

    @classmethod
    def from_recipe(
        cls, recipe: Optional["Recipe"], device: str, registries: "Registries"
    ) -> "AdapterRunner":
        """Every adapter in the ``adapters`` registry of ``registries``, built with the recipe's options."""
        registry = registries.adapters
        switches = recipe.accelerator.adapters if recipe is not None else {}
        adapters = []
        for entry in registry.entries():
            switch = switches.get(entry.name)
            adapters.append(registry.build(entry.name, switch.arguments if switch is not None else {}))
        return cls(adapters, device=device, enabled={name: s.enabled for name, s in switches.items()})

    @property
    def adapters(self) -> List[Any]:
        return list(self._adapters)

    def status(self, name: str) -> Optional[Status]:
        for record in self.records:
            if record.name == name:
                return record.status
        return None

    def _conflicting_applied(self, adapter: Any) -> Optional[str]:
        declared = set(getattr(adapter, "conflicts", ()))
        for record in self.records:
            if record.status is not Status.APPLIED:
                continue
            other = next((a for a in self._adapters if a.name == record.name), None)
            if record.name in declared or adapter.name in set(getattr(other, "conflicts", ())):
                return record.name
        return None

    def _run_one(self, adapter: Any, context: AdapterContext) -> AdapterResult:
        name = adapter.name
        enabled = self._enabled.get(name, getattr(adapter, "enabled_by_default", True))
        if not enabled:
            switch = f"accelerator.adapters.{name}.enabled"
            if name in self._enabled:
                return AdapterResult.skipped(f"disabled by the recipe ({switch}: false)")
            return AdapterResult.skipped(f"off by default ({switch}: true turns it on)")
        rival = self._conflicting_applied(adapter)
        if rival is not None:
            return AdapterResult.skipped(f"conflicts with {rival}, which was applied first")
        try:
            ok, reason = adapter.precheck(context)
        except Exception as error:  # an adapter must never take the run down by itself
            return AdapterResult.failed(f"precheck raised {type(error).__name__}: {error}")
        if not ok:
            return AdapterResult.skipped(reason)
        try:
            result = adapter.apply(context)
        except Exception as error:  # reported as FAILED, the run continues without this optimisation
            return AdapterResult.failed(f"{type(error).__name__}: {error}")
        if not isinstance(result, AdapterResult):
            return AdapterResult.failed(f"apply() returned {type(result).__name__}, not an AdapterResult")
        return result

    def run(self, phase: Phase, context: AdapterContext) -> List[AdapterRecord]:
        """Run this phase's adapters in order; returns (and records) their outcomes."""
        done = []
        for adapter in self._adapters:
            if _phase_of(adapter) is not phase:
                continue
            result = self._run_one(adapter, context)
            record = AdapterRecord(adapter.name, phase, result.status, result.reason)
            if record.status is Status.FAILED:
                logger.warning("adapter %s failed: %s", record.name, record.reason)
            self.records.append(record)
            done.append(record)
        return done

    def summary_table(self, title: str = "") -> str:
        """The start-up table: one line per adapter for this device, in the order they ran."""
        rows = [("phase", "adapter", "status", "reason")]
        rows += [(r.phase.value, r.name, r.status.value, r.reason) for r in self.records]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [title or f"accelerator adapters for {self.device}:"]
        for row in rows:
            padded = "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths))
            lines.append(f"  {padded}  {row[3]}")
        if len(rows) == 1:
            lines.append(f"  (no adapters registered for {self.device})")
        return "\n".join(lines)
