"""Typed, JSON-safe option dataclasses: field type checks, and building one from a plain dict.

Used by FitConfig, LineasConfig and BakeOptions (a class's `LABEL` names it in messages, default
"fit config"). A value of the wrong type, an unknown key or a missing required
key is a BakeError that names the field (`lineas.steps` for a nested one). Supported field types:
str, int, float (an int is accepted and stored as a float), bool, `tuple[X, ...]`, a nested
dataclass, and any of these `| None`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache

from .errors import BakeError


@cache
def hints(cls) -> dict:
    """The resolved field annotations of a dataclass."""
    return typing.get_type_hints(cls)


def _alternatives(hint) -> tuple:
    """The members of a union type (`int | None` → int, NoneType), or the type itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _fits(value, hint) -> bool:
    """Is `value` of the (non-union) type `hint`? bool is not an int here; an int is a float."""
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    """A type in words, for messages: `int | None` → "an integer or null"."""
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    out = []
    for h in _alternatives(hint):
        if typing.get_origin(h) is tuple:
            out.append(f"a list of {_describe(typing.get_args(h)[0]).removeprefix('a ')}s")
        else:
            out.append(names.get(h, f"a {getattr(h, '__name__', h)} object"))
    return " or ".join(out)


def label(cls) -> str:
    return getattr(cls, "LABEL", "fit config")


def check_value(name: str, value, hint, what: str = "fit config"):
    """`value` if it has the type `hint` (ints for floats become floats), else a BakeError naming `name`."""
    for h in _alternatives(hint):
        if _fits(value, h):
            return float(value) if h is float else value
    raise BakeError(f"{what}: {name}: expected {_describe(hint)}, got {value!r}")


def check_fields(obj, prefix: str = "") -> None:
    """Type-check every field of the frozen dataclass `obj` in place (`__post_init__`)."""
    for f in dataclasses.fields(obj):
        value = check_value(prefix + f.name, getattr(obj, f.name), hints(type(obj))[f.name], label(type(obj)))
        object.__setattr__(obj, f.name, value)


def encode(value):
    """A field value as JSON: tuples become lists, nested dataclasses dicts."""
    if dataclasses.is_dataclass(value):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [encode(v) for v in value]
    return value


def _decode(name: str, value, hint, what: str):
    """A JSON value → the field's Python value (lists → tuples, dicts → nested dataclasses)."""
    for h in _alternatives(hint):
        if dataclasses.is_dataclass(h) and isinstance(value, dict):
            return build(h, value, name + ".")
        if typing.get_origin(h) is tuple and isinstance(value, list):
            value = tuple(value)
    return check_value(name, value, hint, what)


def build(cls, data, prefix: str = ""):
    """The dataclass `cls` from a plain dict: unknown keys, missing required keys and wrong types
    are a BakeError naming the field."""
    what = label(cls)
    if not isinstance(data, dict):
        raise BakeError(f"{what}: {prefix.rstrip('.') or cls.__name__}: expected an object, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise BakeError(f"{what}: {prefix}{key}: unknown option (known: {', '.join(fields)})")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BakeError(f"{what}: {prefix}{name}: required")
    return cls(**{k: _decode(prefix + k, v, hints(cls)[k], what) for k, v in data.items()})
