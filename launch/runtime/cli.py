"""The command line of a training stage: ``--help`` with every config key, ``--print-config``,
and the start of a run once its config is final."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from launch.runtime.config import ConfigError, dump_config, load_config
from launch.runtime.dist import Dist
from launch.runtime.engine import Engine, init_distributed
from launch.runtime.monitor import Monitor
from launch.runtime.run_dir import check_resume, claim_run_dir, fingerprint, prepare_run_dir

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
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint (a folder "
                   "without one starts afresh)")
    p.add_argument("--allow-changed", action="append", default=[], metavar="KEY",
                   help="with --resume: a setting allowed to differ from the run's last config (repeatable; a "
                        "section like train. allows all of it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for flag, text in options:
        p.add_argument(flag, default=None, help=text)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
    args = p.parse_intermixed_args(argv)
    args.allow_changed = [k for a in args.allow_changed for k in a.split(",") if k]
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


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: its process group, whether it resumes, and what changed since its last
    config (recorded in the run's config history)."""

    dist: Dist
    resume: bool
    changes: Optional[dict] = None
    identity: Optional[dict] = None  # name -> (fingerprint, hint): what the run's checkpoints record


def start_run(cfg: Any, args: argparse.Namespace, identity: Optional[dict] = None) -> Optional[Start]:
    """Once the config is final (every file checked): print it (``--print-config``; returns None),
    or claim the run folder and check a resume (:mod:`launch.runtime.run_dir`), then join the
    process group. ``identity``: name -> (fingerprint, hint) a resumed run must match, besides the
    model config (always; ``Start.identity`` holds both)."""
    identity = {"model config": (fingerprint(cfg.model), f"resume with the run's config (in {cfg.run.out_dir})"),
                **(identity or {})}
    if args.print_config:
        print(dump_config(cfg), end="")
        return None
    resume = claim_run_dir(cfg.run.out_dir, args.resume)
    changes = check_resume(cfg.run.out_dir, cfg, args.allow_changed, identity) if resume else None
    if changes and os.environ.get("RANK", "0") == "0":
        print("note: --resume with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
              file=sys.stderr)
    return Start(init_distributed(), resume, changes, identity)


def open_run(cfg: Any, start: Start, model, groups: list, schedule) -> tuple[Engine, Monitor]:
    """The engine around ``model`` (its optimizer groups and their lr schedule), the run folder
    prepared (resolved config, config history, ``ds_config.json``) and its monitor started."""
    engine = Engine(model, cfg.train, start.dist, groups, schedule)
    prepare_run_dir(cfg.run, cfg, start.dist, {"ds_config.json": engine.config}, start.changes)
    monitor = Monitor(cfg.run.out_dir, start.dist, resume=start.resume, wandb=cfg.run.wandb)
    monitor.start(cfg, model)
    return engine, monitor
