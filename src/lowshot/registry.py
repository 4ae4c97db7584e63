"""A tiny generic registry: ``@REG.register("name", "alias", **meta)`` + ``REG.create(name, **kw)``.

Backbones, heads, datasets, samplers, few-shot evaluators and stage-2 methods each own one
instance, so a user extends the toolkit by decorating a factory in their own module, never by
editing ours. ``create`` is the one place options are checked: an unknown keyword or a value of
the wrong type (read from the factory's type hints) is a one-line ``ConfigError`` naming the
kind, the name, the option and what it expects. Facts other code needs about a component (a
head's family, a sampler that needs the training horizon, option help) are registration
metadata (``meta``), so no module outside the component's own file names it.
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import difflib
import inspect
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])
_MISSING = inspect.Parameter.empty

OPTION_ERROR = "{what} has no option {key!r}{hint} (valid: {valid})"


@dataclass(frozen=True)
class Option:
    """One keyword option of a factory: its default (``inspect.Parameter.empty`` if required),
    its type hint (``Any`` when unannotated or unresolvable) and a one-line help."""

    name: str
    default: Any
    hint: Any = Any
    help: str = ""


# ----------------------------------------------------------------------------- signatures

def _hints(fn: Any) -> dict[str, Any]:
    """Resolved type hints of ``fn`` ({} when they cannot be resolved, e.g. local types)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations are simply not checked
        return {}


def _factory_options(factory: Any) -> tuple[dict[str, Option], bool]:
    """Keyword options of ``factory`` and whether it forwards more (``**kw``) unchecked.

    A class's ``**kwargs`` are taken to go to its base class's ``__init__`` (the cooperative
    convention), so they are checked against the bases up the MRO; a dataclass's fields carry
    their help in ``metadata["help"]``.
    """
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        hints = _hints(factory)
        return {f.name: Option(f.name, _field_default(f), hints.get(f.name, Any), f.metadata.get("help", ""))
                for f in dataclasses.fields(factory) if f.init}, False
    chain = [c.__dict__["__init__"] for c in factory.__mro__ if "__init__" in c.__dict__ and c is not object] \
        if isinstance(factory, type) else [factory]
    out: dict[str, Option] = {}
    for fn in chain:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
            return out, True
        hints = _hints(fn)
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self" and p.name not in out:
                out[p.name] = Option(p.name, p.default, hints.get(p.name, Any))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return out, False
    return out, True


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


# ----------------------------------------------------------------------------- value checks

# Protocol hints are not checked here (the factory knows what else it accepts, e.g. a bare angle).
_ABSTRACT = (cabc.Sequence, cabc.Iterable, cabc.Collection, cabc.Mapping, cabc.MutableMapping, cabc.Callable)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, in a user's words (``a number or null``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return "a list" + (" of numbers" if inner and all(a in (float, int) for a in inner) else "")
    if origin is dict or hint is dict:
        return "a mapping like {k: v}"
    simple = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return simple.get(hint, f"a {getattr(hint, '__name__', hint)}")


def convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """``(ok, value)``: whether ``value`` fits ``hint``; a float option takes an int (as a float).

    Checked: bool, int, float, str, None, Literal, unions, list/tuple (elements of list[X]), dict and
    other concrete classes (isinstance); unannotated, ``Any`` and protocol hints pass unchecked."""
    if hint is Any or hint is _MISSING or isinstance(hint, (str, TypeVar)):
        return True, value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin in (typing.Union, types.UnionType):
        for a in sorted(args, key=lambda a: a is float):  # exact matches first: an int stays an int in int | float
            ok, v = convert(value, a)
            if ok:
                return True, v
        return False, value
    if hint is type(None) or hint is None:
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return _is_int(value), int(value) if _is_int(value) else value
    if hint is float:
        return _is_real(value), float(value) if _is_real(value) else value
    if origin in _ABSTRACT or hint in _ABSTRACT:
        return True, value  # a protocol (Sequence, Mapping...): the factory checks what it accepts
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        inner = [a for a in args if a is not Ellipsis]
        if len(inner) != 1:
            return True, value
        items = [convert(v, inner[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items] if origin is list else value
    if origin is not None:
        hint = origin
    if isinstance(hint, type):
        try:
            return isinstance(value, hint), value
        except TypeError:  # pragma: no cover - exotic hint
            return True, value
    return True, value


def check_options(spec: dict[str, Option], kwargs: dict[str, Any], what: str, *, skip: int = 0,
                  forwards: bool = False, option_error: str = OPTION_ERROR) -> dict[str, Any]:
    """The one option check (``Registry.check`` and ``checked_call`` use it): unknown keys name the
    valid ones with a did-you-mean, wrong-typed values say what was expected, on one line."""
    valid = list(spec)[skip:]
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key not in valid:
            if forwards:
                continue  # the factory forwards options itself (and checks them)
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(option_error.format(what=what, key=key, hint=hint,
                                                  valid=", ".join(sorted(valid)) or "none"))
        ok, out[key] = convert(value, spec[key].hint)
        if not ok:
            raise ConfigError(f"{what} option {key!r} expects {describe(spec[key].hint)}, got {value!r}")
    return out


def checked_call(factory: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)`` with the registry's option check, for an unregistered typed
    factory (e.g. an options dataclass); ``what`` names it in errors."""
    spec, forwards = _factory_options(factory)
    return factory(*args, **check_options(spec, kwargs, what, skip=len(args), forwards=forwards))


# ----------------------------------------------------------------------------- the registry

class Registry(Generic[T]):
    """Named factories with aliases, per-name metadata and one option checker (``create``).

    ``option_error`` formats an unknown option (fields what, key, hint, valid).
    """

    def __init__(self, kind: str, *, option_error: str = OPTION_ERROR) -> None:
        self.kind = kind
        self.option_error = option_error
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._specs: dict[Any, tuple[dict[str, Option], bool]] = {}

    def register(self, name: str | None = None, *aliases: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering a factory under ``name`` (default: its ``__name__``); ``meta``
        (e.g. ``family=`` for heads) is returned by ``meta(name)``."""

        def deco(fn: T) -> T:
            key = name or fn.__name__
            for k in (key, *aliases):
                if k in self._items or k in self._aliases:
                    raise ValueError(f"{self.kind} {k!r} is already registered")
            self._items[key] = fn
            self._meta[key] = dict(meta)
            for a in aliases:
                self._aliases[a] = key
            return fn

        return deco

    def unregister(self, name: str) -> None:
        """Forget ``name`` and its aliases (plug-in tests clean up with this)."""
        key = self.canonical(name)
        self._items.pop(key, None)
        self._meta.pop(key, None)
        for a in [a for a, k in self._aliases.items() if k == key]:
            del self._aliases[a]

    def canonical(self, name: str) -> str:
        """The registered name behind ``name`` (resolving aliases); clear error if unknown."""
        if name in self._items:
            return name
        if name in self._aliases and self._aliases[name] in self._items:
            return self._aliases[name]
        known = sorted([*self._items, *(a for a, k in self._aliases.items() if k in self._items)])
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})")

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata ``name`` (or an alias) was registered with (a copy; {} if none)."""
        return dict(self._meta.get(self.canonical(name), {}))

    def options(self, name: str) -> dict[str, Option]:
        """The keyword options the factory of ``name`` declares, in signature order."""
        return dict(self._spec(self.get(name))[0])

    def _spec(self, factory: Any) -> tuple[dict[str, Option], bool]:
        if factory not in self._specs:
            self._specs[factory] = _factory_options(factory)
        return self._specs[factory]

    def check(self, name: str, kwargs: dict[str, Any], *, skip: int = 0) -> dict[str, Any]:
        """``kwargs`` checked against the factory of ``name`` (converted: int -> float where a float
        is expected); the first ``skip`` parameters are taken positionally and not options."""
        canonical = self.canonical(name)
        spec, forwards = self._spec(self._items[canonical])
        return check_options(spec, kwargs, f"{self.kind} {canonical!r}", skip=skip, forwards=forwards,
                             option_error=self.option_error)

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory with checked options (see ``check``); positional ``args`` are not options."""
        factory = self.get(name)
        return factory(*args, **self.check(name, kwargs, skip=len(args)))

    def names(self, include_aliases: bool = False) -> list[str]:
        names = list(self._items)
        if include_aliases:
            names += [a for a, k in self._aliases.items() if k in self._items]
        return sorted(names)

    def aliases(self, name: str) -> list[str]:
        """The aliases of ``name``, sorted."""
        key = self.canonical(name)
        return sorted(a for a, k in self._aliases.items() if k == key)

    def __contains__(self, name: object) -> bool:
        return name in self._items or (name in self._aliases and self._aliases[name] in self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
