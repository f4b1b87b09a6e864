"""A small typed registry: name -> factory (+ the pydantic model that validates its options)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, Iterator, List, Mapping, Optional, Type, TypeVar, Union

from pydantic import BaseModel, ConfigDict

from streampetr_plugin.errors import InputError

T = TypeVar("T")


class RegistryError(InputError, LookupError):
    """A duplicate or unknown component name."""


class NoOptions(BaseModel):
    """Params of a component that takes no options: any key is an error."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component."""

    name: str
    factory: Callable[..., T]
    params: Optional[Type[BaseModel]]
    provider: str


class Registry(Generic[T]):
    """Components of one kind (``backbones``, ``necks``, ...), keyed by name.

    ``register(name, factory, params=...)`` is the callback handed to the registration hooks;
    ``provider`` (the plugin's name) is filled in by the plugin manager so errors can say who
    registered what. A component with a ``params`` model is built as ``factory(params, **context)`` from
    a validated instance of it; one without takes its options unchecked, ``factory(**options, **context)``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., T],
        *,
        params: Optional[Type[BaseModel]] = None,
        provider: str = "<unknown>",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind}: component names must be non-empty strings, got {name!r}")
        if name in self._entries:
            first = self._entries[name].provider
            raise RegistryError(
                f"{self.kind}: {name!r} is registered twice, by plugin {first!r} and by plugin {provider!r}"
            )
        self._entries[name] = Entry(name=name, factory=factory, params=params, provider=provider)

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        available = ", ".join(sorted(self._entries)) or "none"
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind[:-1] if self.kind.endswith('s') else self.kind} {name!r} (available: {available}){hint}"

    def validate(self, name: str, options: Mapping[str, Any]) -> Optional[BaseModel]:
        """``options`` checked (and defaulted) by the component's params model, as an instance of it; None
        for a component without one. Raises pydantic's ``ValidationError``."""
        entry = self.get(name)
        return None if entry.params is None else entry.params.model_validate(dict(options))

    def build(self, name: str, options: Union[BaseModel, Mapping[str, Any]], **context: Any) -> T:
        """Instantiate ``name`` from its params instance (validated once, by the recipe loader) or from plain
        options (validated here), plus context (shapes from other modules)."""
        entry = self.get(name)
        if entry.params is None:
            return entry.factory(**dict(options), **context)
        params = options if isinstance(options, entry.params) else self.validate(name, options)
        return entry.factory(params, **context)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def entries(self) -> List[Entry[T]]:
        return [self._entries[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
