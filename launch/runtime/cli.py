"""The command line of a training stage: ``--help`` with every config key, ``--print-config``,
and the start of a run once its config is final."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from launch.runtime.config import ConfigError, dump_config, load_config
from launch.runtime.dist import Dist
from launch.runtime.engine import init_distributed
from launch.runtime.run_dir import check_run_dir

T = TypeVar("T")


def type_name(tp: Any) -> str:
    """How a field's type reads in ``--help``: ``int``, ``fp32|bf16|fp16``, ``[float, float]``, ``str|null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (Union, types.UnionType):
        return "|".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is Ellipsis:
            return f"[{type_name(args[0])}, ...]"
        return "[" + ", ".join(type_name(a) for a in args) + "]" if args else "list"
    return getattr(tp, "__name__", str(tp))


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """``(key, type, value)`` of every leaf setting of a config, depth first, in field order."""
    rows = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, type_name(tp), list(value) if isinstance(value, tuple) else value))
    return rows


def parse_run_args(argv: list[str], schema: type[T], description: str, default_config: str,
                   options: tuple[tuple[str, str], ...] = ()) -> tuple[argparse.Namespace, T]:
    """The command line of a training stage: ``[--config F] [--resume] [--print-config] [OPTION X]
    [key=value ...]`` in any order. Returns ``(args, config)``. ``--help`` lists every config key
    with its type and its value after ``--config`` and the overrides, then exits."""
    p = argparse.ArgumentParser(description=description, add_help=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true", help="this help, with every config key, and exit")
    p.add_argument("--config", default=default_config, help="run YAML (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for flag, text in options:
        p.add_argument(flag, default=None, help=text)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
    args = p.parse_intermixed_args(argv)
    if args.help:
        try:
            cfg, origin = load_config(schema, args.config, args.overrides), f"after {args.config}"
        except ConfigError as e:
            cfg, origin = schema(), f"defaults ({args.config} did not load: {e})"
        rows = describe(cfg)
        wk, wt = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        print(p.format_help())
        print(f"config keys (set with key=value; values {origin}):")
        for key, tname, value in rows:
            print(f"  {key:<{wk}}  {tname:<{wt}}  {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(chr(10) + '...')}")
        sys.exit(0)
    return args, load_config(schema, args.config, args.overrides)


def start_run(cfg: Any, print_config: bool, resume: bool) -> Optional[Dist]:
    """Once the config is final (every file checked): print it (``--print-config``; returns None),
    or check the run folder, then join the process group."""
    if print_config:
        print(dump_config(cfg), end="")
        return None
    check_run_dir(cfg.run.out_dir, resume)
    return init_distributed()
