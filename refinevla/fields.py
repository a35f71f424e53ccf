"""Typed config fields: each carries its help text and allowed values, and strings are converted strictly.

``opt(default, help, choices=..., ge=..., gt=..., le=..., lt=...)`` declares a dataclass field;
``check_section(stage, prefix)`` converts every field of a stage config to its annotated type and checks its
choices and bounds; ``set_field`` converts one override. Errors are ``ConfigError``s: one line naming the key,
the value and what is allowed. The stage configs themselves are in ``refinevla.config``.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from dataclasses import fields

import yaml


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key, the value and what is allowed."""


class ConfigKeyError(ConfigError, KeyError):
    """A config key that names no field (or several): a ConfigError, and a KeyError as before."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def opt(default=dataclasses.MISSING, help: str = "", *, factory=None, choices=None,  # noqa: A002 - field help
        ge=None, gt=None, le=None, lt=None):
    """A dataclass field with its help text and allowed values (checked by ``validate``, listed by ``describe_keys``;
    for lists and mappings they apply to each element / value)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _bad(key: str, value, allowed: str) -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ConfigError(f"{key}={shown}: expected {allowed}")


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_NONE = ("none", "null", "~", "")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0]).split(' (')[0].removeprefix('an ').removeprefix('a ')}s"
    if origin is dict or tp is dict:
        return "a mapping {key: value}" if not args else f"a mapping {{{_type_name(args[0])[2:]}: ...}}"
    return {bool: "true or false (also yes/no, 1/0)", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def allowed(f: dataclasses.Field, tp) -> str:
    """What field ``f`` (of type ``tp``) accepts, in words: its type, then its choices and bounds (for a list or a
    mapping: of each element / value)."""
    meta, words = f.metadata, _type_name(tp)
    origin = typing.get_origin(tp)
    each = "each " if origin in (list, tuple, dict) or tp is dict else ""
    if meta.get("choices"):
        choices = "one of " + ", ".join(map(str, meta["choices"]))
        words = choices if tp is str else f"{words}, {each}{choices}"
    bounds = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(k) is not None]
    if bounds:
        words += (f", {each}" if each else " ") + " and ".join(bounds)
    return words


def _convert(value, tp, key: str, what: str):
    """``value`` as type ``tp``; strings (command line, notebooks) are parsed; anything else is refused."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(value, inner, key, what)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _bad(key, value, what) from None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, str):
            parsed = _yaml(value, key, what)
            value = [v.strip() for v in parsed.split(",") if v.strip()] if isinstance(parsed, str) else parsed
        if isinstance(value, (list, tuple)):
            return [_convert(v, args[0], key, what) for v in value]
    elif origin is dict or tp is dict:
        if isinstance(value, str):
            value = _yaml(value, key, what)
        if isinstance(value, dict):
            if not args:
                return dict(value)
            return {_convert(k, args[0], key, what): _convert(v, args[1], f"{key}.{k}", what)
                    for k, v in value.items()}
    raise _bad(key, value, what)


def _yaml(text: str, key: str, what: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise _bad(key, text, what) from None


def _leaves(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif value is not None:
        yield value


def _field(stage, name: str) -> dataclasses.Field:
    return {f.name: f for f in fields(stage)}[name]


def set_field(stage, name: str, value, key: str) -> None:
    """Set ``stage.name`` to ``value`` converted to the field's type (a ConfigError naming ``key`` if it cannot)."""
    f = _field(stage, name)
    tp = _hints(type(stage))[name]
    setattr(stage, name, _convert(value, tp, key, allowed(f, tp)))


def check_section(stage, prefix: str) -> None:
    """Convert every field of one stage config to its type and check its choices and bounds, then the section's
    own rules (``stage.check``); a ConfigError names ``prefix.field``."""
    hints = _hints(type(stage))
    for f in fields(stage):
        key, what = f"{prefix}.{f.name}", allowed(f, hints[f.name])
        value = _convert(getattr(stage, f.name), hints[f.name], key, what)
        object.__setattr__(stage, f.name, value)
        meta = f.metadata
        for leaf in _leaves(value):
            if meta.get("choices") and leaf not in meta["choices"]:
                raise _bad(key, value if not isinstance(value, (list, dict)) else leaf, what)
            for bound, ok in (("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b),
                              ("le", lambda v, b: v <= b), ("lt", lambda v, b: v < b)):
                if meta.get(bound) is not None and not ok(leaf, meta[bound]):
                    raise _bad(key, value, what)
    stage.check(prefix)
