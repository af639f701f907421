"""The run folder: claimed, checked and prepared before any process work; its identity; what its
end says.

``run.out_dir`` holds ``config.yaml`` (the resolved config; each resume adds
``config.resume-N.yaml``, never overwriting it), ``ds_config.json``, ``metrics.jsonl``, ``tb/``, the
stage's outputs, ``checkpoints/`` (:mod:`launch.runtime.checkpoints`) and ``.lock``: rank 0 of the
run holds an OS lock on it (``fcntl.lockf``) for the run's life, so a second run on the same folder
is refused while the first lives, and a killed run leaves no stale lock (a POSIX record lock
belongs to the process that took it: the DataLoader workers it forks do not hold it on).

What may change on ``--resume`` (:func:`check_resume`, the one check; the README's table):
the data position's shape (ranks, ``train.micro_batch_size``, ``train.grad_accum``,
``train.num_workers``) and the model and tokenizer never; reporting settings (``run.*``,
``guard.*``, ``val_every``, ``vis_*``) freely; every other setting (learning rate, steps,
schedule, data, augmentation, freezing...) only when named with ``--allow-changed KEY``.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from launch.runtime import checkpoints
from launch.runtime.config import ConfigError, RunConfig, dump_config, to_dict
from launch.runtime.dist import Dist, barrier
from mae.common.files import atomic_write_text

LOCK_FILE, CONFIG_FILE = ".lock", "config.yaml"
SHAPE = ("train.micro_batch_size", "train.grad_accum", "train.num_workers")
FREE = ("run.", "guard.", "val_every", "vis_every", "vis_images")
_held: list = []  # the lock's open file, kept for the process's life


def claim_run_dir(out_dir: str, resume: bool) -> bool:
    """Refuse, before any process work, a folder that cannot be written, one another live run holds,
    one that holds a run when ``--resume`` is not given (a restart must never overwrite a run).
    Returns whether the run resumes: ``--resume`` into a folder with no checkpoint yet starts afresh
    (saying so)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f".write_test.{os.getpid()}", "w") as f:
            f.write("ok")
        os.unlink(out / f".write_test.{os.getpid()}")
    except OSError as e:
        raise ConfigError(f"run.out_dir={out_dir}: cannot write there ({e.strerror or e})") from None
    if os.environ.get("RANK", "0") == "0":
        lock(out)
    existing = checkpoints.describe_run(out)
    if not resume and existing:
        raise ConfigError(f"run.out_dir={out_dir} already holds a run ({existing}); continue it with --resume, "
                          "or choose another run.out_dir")
    if resume and not checkpoints.tags_by_step(out / "checkpoints"):
        if os.environ.get("RANK", "0") == "0":
            print(f"note: --resume: no checkpoint in {out / 'checkpoints'} yet: starting the run afresh", file=sys.stderr)
        return False
    return resume


def lock(out: Path) -> None:
    """Hold ``out/.lock`` for this process's life, or one line naming the process that holds it."""
    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX lock: this process's, not its workers'
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"run.out_dir={out} is in use by another run ({holder}); wait for it to end or choose "
                          "another run.out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
    f.flush()
    _held.append(f)


def config_history(out: Path) -> list[Path]:
    """``config.yaml`` and every ``config.resume-N.yaml``, oldest first."""
    resumes = sorted(out.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return ([out / CONFIG_FILE] if (out / CONFIG_FILE).is_file() else []) + resumes


def _leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(out_dir: str, cfg: Any, allow: list[str], identity: dict) -> dict[str, tuple]:
    """The one check of what changed since the run's last configuration (module docstring): refused
    with one line, or the changes ``{key: (before, now)}`` to record. ``identity``: name ->
    (fingerprint, hint), compared with what the newest checkpoint was written with."""
    out = Path(out_dir)
    state = _newest_resume_state(out / "checkpoints")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state is not None:
        for name, (fp, hint) in identity.items():
            was = state["identity"].get(name)
            if was is not None and was != fp:
                raise ConfigError(f"--resume: the run was trained with another {name} ({was}, this run has {fp}); {hint}")
        if state["world_size"] != world:
            raise ConfigError(
                f"--resume: the checkpoint was written by {state['world_size']} ranks, this run has {world}; the data "
                f"position, ZeRO partitions and the global batch ({state['global_batch']}) belong to "
                f"{state['world_size']} ranks: resume with {state['world_size']}")
    history = config_history(out)
    if not history:
        return {}
    before = _leaves(yaml.safe_load(history[-1].read_text(encoding="utf-8")) or {})
    now = _leaves(to_dict(cfg))
    changes = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    changes.pop("run.out_dir", None)  # the same folder, however it was written
    for key, (was, new) in changes.items():
        if key in SHAPE or key.startswith("model."):
            what = "data position" if key in SHAPE else "model"
            raise ConfigError(f"--resume: {key} was {was!r}, this run has {new!r}; the {what} of a run cannot change "
                              f"on resume (start another run.out_dir)")
        if not key.startswith(FREE) and not any(key == a or key.startswith(a.rstrip(".") + ".") for a in allow):
            raise ConfigError(f"--resume: {key} was {was!r}, this run has {new!r}; resume with the run's settings "
                              f"(--config {history[-1]}) or allow the change with --allow-changed {key}")
    return changes


def _newest_resume_state(ckpt: Path) -> Optional[dict]:
    """Rank 0's resume state of the newest checkpoint that can be read (None if none can)."""
    for tag in reversed(checkpoints.tags_by_step(ckpt)):
        try:
            # mmap: only the small fields are read here, not the tensors it carries (an EMA is a model's worth)
            return torch.load(ckpt / tag / checkpoints.resume_file(0), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - a damaged checkpoint: the load falls back past it too
            continue
    return None


def prepare_run_dir(run: RunConfig, cfg: Any, dist: Dist, extra: Optional[dict] = None,
                    changes: Optional[dict] = None) -> Path:
    """Create ``run.out_dir`` on rank 0 with ``checkpoints/``, the JSON files of ``extra`` (name ->
    object, e.g. ``ds_config.json``) and the config: ``config.yaml`` for a new run, the next
    ``config.resume-N.yaml`` (with what changed, ``changes``) for a resumed one."""
    out = Path(run.out_dir)
    if dist.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        history = config_history(out)
        if changes is None or not history:
            atomic_write_text(out / CONFIG_FILE, dump_config(cfg))
        else:
            n = len(history)
            header = f"# resumed ({n} of this run); changed since {history[-1].name}: " + (
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()) or "nothing") + "\n"
            atomic_write_text(out / f"config.resume-{n}.yaml", header + dump_config(cfg))
        for name, obj in (extra or {}).items():
            atomic_write_text(out / name, json.dumps(obj, indent=2, ensure_ascii=False))
    barrier(dist)
    return out


def fingerprint(cfg: Any) -> str:
    """First 16 hex digits of the sha256 of a config (as sorted JSON)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
