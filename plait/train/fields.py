"""The fields of a config dataclass: their type and range checked, their docstrings, their plain values.

One way to check a value, shared by every config dataclass (``plait train``'s sections, each strategy's
own) and every way a value arrives (a TOML file, a command-line flag): :func:`typed` checks a value
against the field's annotation (an ``int`` field takes no 1.5 and no "1", a ``bool`` no "false", a
``float`` nothing that is not finite), :func:`check_fields` runs it over every field of an instance,
then the class's ``ranges``. :func:`field_docs` reads each field's docstring (its ``--help`` text),
:func:`plain` turns a value into what TOML holds, and :func:`from_text` reads a flag's text as one.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import functools
import importlib
import inspect
import itertools
import json
import math
import textwrap
import tomllib
import types
import typing
from typing import Any

from plait.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds a number must keep; unset bounds do not apply."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __str__(self) -> str:
        bounds = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
        return " and ".join(f"{op} {bound:g}" for op, bound in bounds if bound is not None)

    def check(self, name: str, value: float) -> None:
        fits = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        if not fits:
            raise ConfigError(f"{name}={value!r} must be {self}")


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)


def _describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(arm) for arm in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if origin in (collections.abc.Mapping, dict):
        return f"a table of {_describe(args[0])} -> {_describe(args[1])}"
    if origin is type:
        return f"the import path of a {args[0].__name__} class (such as 'package.module.Class')"
    words = {
        bool: "true or false",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        type(None): "nothing (unset)",
    }
    if hint in words:
        return words[hint]
    return f"a {getattr(hint, '__name__', hint)}" + (" table" if dataclasses.is_dataclass(hint) else "")


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    return names.get(type(value), f"a {type(value).__name__}")


def _import(name: str, path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{name}={path!r} does not import ({e}); give 'package.module.Class'") from None


def typed(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (an int widened to float, a list to a tuple,
    an import path to its class, a table to its dataclass); a ConfigError naming what would fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        if len(arms) == 1:
            return typed(name, value, arms[0])
        for arm in arms:
            try:
                return typed(name, value, arm)
            except ConfigError:
                continue
    elif hint is Any:
        return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} is not a finite number; {name} takes a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list | tuple):
            return tuple(typed(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
    elif origin in (collections.abc.Mapping, dict):
        if isinstance(value, collections.abc.Mapping):
            return {typed(name, k, args[0]): typed(f"{name}[{k!r}]", v, args[1]) for k, v in value.items()}
    elif origin is type:
        found = _import(name, value) if isinstance(value, str) else value
        if isinstance(found, type) and issubclass(found, args[0]):
            return found
    elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if isinstance(value, collections.abc.Mapping):
            return from_mapping(hint, value, name)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{name}={value!r} is {_kind(value)}; {name} takes {_describe(hint)}")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of the dataclass ``cls``."""
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def check_fields(config: Any) -> None:
    """Type-check every field of a frozen config dataclass (normalising in place), then its ``ranges``."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        checked = typed(field.name, value, hints(type(config))[field.name])
        if checked is not value:
            object.__setattr__(config, field.name, checked)
    for name, bounds in getattr(config, "ranges", {}).items():
        if getattr(config, name) is not None:
            bounds.check(name, getattr(config, name))


def from_mapping(cls: type, given: collections.abc.Mapping, where: str) -> Any:
    """An instance of the dataclass ``cls`` from ``{field: value}``; unknown names are a ConfigError."""
    known = hints(cls)
    unknown = set(given) - set(known)
    if unknown:
        raise ConfigError(f"[{where}] has no field(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: typed(k, v, known[k]) for k, v in given.items()})


def plain(value: Any) -> Any:
    """``value`` as TOML / JSON can hold it: dataclasses and mappings as tables, classes as import paths."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, collections.abc.Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _is_text(hint: Any) -> bool:
    """Whether a command-line value of type ``hint`` is the text itself (a string, an import path)."""
    return hint is str or typing.get_origin(hint) is type


def from_text(text: str, hint: Any) -> Any:
    """A command-line value as the plain value a TOML file would hold for a field of type ``hint``.

    Strings stay strings where the field takes one (unless the text is an inline table ``{...}`` and
    the field also takes an object, as ``compression`` takes "powersgd" or ``{rank = 2}``); otherwise
    the text is read as a TOML value (``3``, ``1e-3``, ``nan``, ``[2, 4]``, ``{"blocks.*" = "col"}``),
    else as JSON, else as a comma-separated list: :func:`typed` then checks it exactly as it checks a
    TOML file's value.
    """
    arms = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    takes_table = any(dataclasses.is_dataclass(arm) for arm in arms)
    if any(_is_text(arm) for arm in arms) and not (takes_table and text.lstrip().startswith("{")):
        return text
    if any(typing.get_origin(arm) is tuple and _is_text(typing.get_args(arm)[0]) for arm in arms):
        return json.loads(text) if text.startswith("[") else text.split(",")
    if text.lower() == "none" and type(None) in arms:
        return None
    for parse in (
        lambda t: tomllib.loads(f"v = {t}")["v"],
        json.loads,
        lambda t: tomllib.loads(f"v = [{t}]")["v"],
    ):
        try:
            return parse(text)
        except ValueError:
            continue
    return text
