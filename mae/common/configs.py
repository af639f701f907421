"""Frozen dataclass configs from plain data: the one builder of every config in the project.

Run configs (YAML + ``key=value`` overrides, :mod:`launch.runtime.config`) and the model configs
stored in checkpoints (:mod:`mae.checkpoint`, :mod:`clip.model.checkpoint`) are built here:
:func:`build` fills a dataclass schema from nested dicts, field by field, with strict types
(an integer is not a float, a string is not a number, a tuple has its length, a ``Literal`` its
values), unknown keys refused, each schema's own ``__post_init__`` checks run; every problem is
one :class:`ConfigError` line naming the dotted key and where the value came from.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, missing file, impossible setting."""


def build(schema: type, data: Any, source: str = "config", base: Any = None, prefix: str = ""):
    """``base`` (default: ``schema()``) updated with ``data`` (a nested mapping; missing keys keep
    the base's values). ``source`` names where ``data`` came from in errors."""
    return _build(schema, data, prefix, source, base)


def _build(schema: type, data: Any, prefix: str, source: str, base: Any = None):
    """``base`` (default: ``schema()``) updated with ``data``; nested dataclasses start from the
    parent's default for that field, so a schema's own defaults survive partial overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r} ({source})")
    if base is None:
        base = schema()
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' ({source}); known keys here: {known}")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", source, getattr(base, name))
        else:
            kwargs[name] = _coerce(tp, value, key, source)
    try:
        return dataclasses.replace(base, **kwargs)
    except ValueError as e:  # a schema's own check, whose message starts with the field's name
        raise ConfigError(f"{prefix}{e} ({source})") from None
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e} ({source})") from None


def _coerce(tp: Any, value: Any, key: str, source: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is Any:
        return value
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise ConfigError(f"'{key}' must be one of {', '.join(map(str, args))}, got {value!r} ({source})")
    if origin in (tuple, list):
        if isinstance(value, str):
            raise ConfigError(f"'{key}' expects a list, got {value!r} ({source})")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' expects a list, got {value!r} ({source})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{key}' expects {len(args)} values, got {len(value)} ({source})")
            return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' expects a mapping, got {value!r} ({source})")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' expects true/false, got {value!r} ({source})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' expects an integer, got {value!r} ({source})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' expects a number, got {value!r} ({source})")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' expects a string, got {value!r} ({source})")
    return value


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) of a config, for YAML/JSON and checkpoints."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


