"""A tiny generic registry: ``@REG.register("name", "alias")`` + ``REG.create(name, **kw)``.

Backbones, heads, datasets, samplers and few-shot evaluators each own one instance, so a
user extends the toolkit by decorating a factory in their own module, never by editing ours.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])


def _keyword_names(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _unknown_keywords(fn: Callable[..., Any], kwargs: dict[str, Any]) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []  # the factory forwards options itself (and checks them)
    names = _keyword_names(fn)
    return [k for k in kwargs if k not in names]


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str | None = None, *aliases: str) -> Callable[[T], T]:
        """Decorator registering a factory under ``name`` (default: its ``__name__``)."""

        def deco(fn: T) -> T:
            key = name or fn.__name__
            for k in (key, *aliases):
                if k in self._items or k in self._aliases:
                    raise ValueError(f"{self.kind} {k!r} is already registered")
            self._items[key] = fn
            for a in aliases:
                self._aliases[a] = key
            return fn

        return deco

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (resolving aliases); clear error if unknown."""
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = sorted([*self._items, *self._aliases])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})")

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory; an option it does not take is a ConfigError listing the valid ones."""
        factory = self.get(name)
        unknown = _unknown_keywords(factory, kwargs)
        if unknown:
            valid = sorted(_keyword_names(factory))
            close = difflib.get_close_matches(unknown[0], valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{self.kind} {self.canonical(name)!r} has no option {unknown[0]!r}{hint} "
                              f"(valid: {', '.join(valid)})")
        return factory(*args, **kwargs)

    def names(self, include_aliases: bool = False) -> list[str]:
        names = list(self._items)
        if include_aliases:
            names += list(self._aliases)
        return sorted(names)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
