"""Registries of named policies: the one list of names that ``SamplingParams`` accepts.

A :class:`Registry` maps names to objects; an entry may be registered lazily as a loader (a zero-argument
callable), so that listing and checking names imports nothing heavy (no torch): the built-in policies are loaded
the first time one is looked up. Plain standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Names", "Registry"]


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind (``kind`` names it in messages), in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | None] = {}
        self._loaders: dict[str, Callable[[], T]] = {}

    def register(self, name: str, entry: T) -> None:
        """Add ``entry`` under ``name`` (replacing an entry of that name)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string; got {name!r}.")
        self._entries[name] = entry
        self._loaders.pop(name, None)

    def register_lazy(self, name: str, loader: Callable[[], T]) -> None:
        """Add ``name`` now; its entry is ``loader()``, called the first time it is looked up."""
        self._entries[name] = None
        self._loaders[name] = loader

    def unregister(self, name: str) -> None:
        """Remove ``name`` (KeyError when it is not registered)."""
        if name not in self._entries:
            raise KeyError(f"no {self.kind} named {name!r}")
        del self._entries[name]
        self._loaders.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if entry is None and name in self._loaders:
            entry = self._entries[name] = self._loaders.pop(name)()
        return entry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries  # (an unhashable value is simply not a name)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


class Names(Sequence[str]):
    """A live, read-only tuple-like view of a registry's names (what ``choices=`` and ``in`` need)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, i):
        return self._registry.names()[i]

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.names())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (Names, tuple, list)) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))
