"""A registry of named entries: each extension point (connectors, vision backends,
templates, benchmarks, LLM and vision families) owns one.

    CONNECTORS = Registry("connector")

    @CONNECTORS.register("linear")
    class LinearConnector(nn.Module): ...

    CONNECTORS.get("linaer")   # ConfigError: unknown connector 'linaer' (did you mean 'linear'?)

Names match exactly (never by substring or prefix); registering a taken name is an error,
so two entries cannot silently shadow each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from tinylmm.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for messages: "connector", "benchmark" ...
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """`register(name, entry)`, or `@register(name)` on a class or function. The entry
        learns its name as `registry_name` where it can hold an attribute."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ConfigError(f"{self.kind} '{name}' is registered already")
            self._entries[name] = obj
            try:
                obj.registry_name = name
            except (AttributeError, TypeError):  # frozen dataclasses, builtins: the name is the key
                pass
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str, where: str | None = None) -> T:
        """The entry `name`; unknown: a ConfigError naming `where` (the config key) and the closest name."""
        if name not in self._entries:
            known = sorted(self._entries)
            raise ConfigError(
                f"unknown {self.kind} '{name}'"
                + (f" in {where}" if where else "")
                + f"{did_you_mean(name, known)}; known: {', '.join(known)}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
