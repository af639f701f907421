"""The run folder's resume checkpoints: writing, verifying, choosing, pruning.

``<out_dir>/checkpoints/step_XXXXXXX/`` holds DeepSpeed's files (model, optimizer, schedule),
one ``resume_rank{r}.pt`` per rank (data position, random states, counters: what makes a resume
exact) and, written last, ``manifest.json`` (every file with its size). ``checkpoints/latest``
names the newest tag and is written, atomically, only after its manifest: a crash at any point of
a save leaves ``latest`` on the previous complete checkpoint. On resume a checkpoint is used only
if its manifest lists every file at its size and every torch file passes its zip checksums;
otherwise the next older one is tried, with a warning.

DeepSpeed's own files are pickles (its optimizer state needs it): resume only from run folders
you trust. Everything exported (``mae_ckpt.pt``, ``clip_ckpt.pt``) loads weights-only.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Optional

import torch

from launch.runtime.config import ConfigError
from launch.runtime.dist import Dist, all_ranks_true, barrier, fault_point
from mae.common.files import WriteError, atomic_open, atomic_write_text

LATEST, MANIFEST = "latest", "manifest.json"
_TAG = re.compile(r"^step_(\d+)$")


def resume_file(rank: int) -> str:
    return f"resume_rank{rank}.pt"


def tag_step(tag: str) -> Optional[int]:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def tags_by_step(ckpt_dir: Path) -> list[str]:
    """The ``step_*`` folders, oldest first (by step number, not by name)."""
    tags = [p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and tag_step(p.name) is not None]
    return sorted(tags, key=tag_step)


def describe_run(out_dir: Path) -> Optional[str]:
    """What in ``out_dir`` shows a run already lives there (None if nothing does)."""
    ckpt = out_dir / "checkpoints"
    tags = tags_by_step(ckpt) if ckpt.is_dir() else []
    if tags:
        return f"checkpoints up to {tags[-1]}"
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return "a metrics.jsonl"
    return None


def save(engine, out_dir: Path, step: int, keep_last: int, dist: Dist, state: dict) -> None:
    """Write checkpoint ``step_{step:07d}`` (every rank calls this), then point ``latest`` at it and
    prune: the newest ``keep_last`` tags up to ``step`` stay (0 keeps all), and never the one
    ``latest`` names."""
    ckpt = Path(out_dir) / "checkpoints"
    tag = f"step_{step:07d}"
    try:
        (ckpt / tag).mkdir(parents=True, exist_ok=True)
        with atomic_open(ckpt / tag / resume_file(dist.rank), "wb") as f:
            torch.save(state, f)
        engine.save_checkpoint(str(ckpt), tag)
        fault_point("save", step)  # DeepSpeed's files written, manifest and latest not yet
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError
        raise save_failed(ckpt, tag, e) from None
    barrier(dist)
    if dist.is_main:
        files = {str(p.relative_to(ckpt / tag)): p.stat().st_size
                 for p in sorted((ckpt / tag).rglob("*")) if p.is_file() and p.name != MANIFEST}
        atomic_write_text(ckpt / tag / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
        atomic_write_text(ckpt / LATEST, tag)
        if keep_last > 0:
            older = [t for t in tags_by_step(ckpt) if tag_step(t) <= step and t != tag]
            for old in older[: max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(ckpt / old, ignore_errors=True)
    barrier(dist)


def save_failed(ckpt: Path, tag: str, e: Exception) -> WriteError:
    """The one-line error of a checkpoint that could not be written, its partial folder removed
    (``latest`` still names the previous one, which a resume uses)."""
    reason, code = " ".join(str(e).split()), getattr(e, "errno", None)
    if code == errno.EDQUOT:
        reason = "disk quota exceeded"
    elif code == errno.ENOSPC or "write failed" in reason:  # torch's RuntimeError for a full disk
        reason = "no space left on the device"
    previous = [t for t in tags_by_step(ckpt) if t != tag]
    need = ""
    if previous:
        size = sum(p.stat().st_size for p in (ckpt / previous[-1]).rglob("*") if p.is_file())
        need = f"; a checkpoint takes about {size / 2**20:,.0f} MiB, {shutil.disk_usage(ckpt).free / 2**20:,.0f} MiB are free"
    shutil.rmtree(ckpt / tag, ignore_errors=True)
    kept = f"checkpoints/latest still names {previous[-1]}" if previous else "no checkpoint was written before"
    return WriteError(getattr(e, "errno", None) or errno.EIO,
                      f"cannot save checkpoint {tag} in {ckpt}: {reason}{need}; nothing else was changed ({kept}): "
                      "free space and resume with --resume")


def verify(tag_dir: Path) -> Optional[str]:
    """Why the checkpoint in ``tag_dir`` cannot be used, or None if it is complete and intact."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest.json (the save did not finish)"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (OSError, zipfile.BadZipFile) as e:
                return f"{name} is damaged ({e})"
            if bad is not None:
                return f"{name} is damaged (checksum of {bad})"
    return None


def _candidates(ckpt: Path) -> list[str]:
    """``latest``'s tag first, then every other tag, newest first."""
    try:
        named = (ckpt / LATEST).read_text().strip()
    except OSError:
        named = ""
    tags = tags_by_step(ckpt)[::-1]
    return ([named] if named in tags else []) + [t for t in tags if t != named]


def load(engine, out_dir: Path, dist: Dist) -> tuple[int, dict]:
    """Load the newest usable checkpoint: ``(step, this rank's resume state)``.

    ``engine`` gets DeepSpeed's state (model, optimizer); the caller restores the rest from the resume
    states. Every rank checks every candidate and they agree before loading. (What may differ
    from the run that wrote it was checked before any process work: ``run_dir.check_resume``.)
    """
    ckpt = Path(out_dir) / "checkpoints"
    for tag in _candidates(ckpt):
        problem = verify(ckpt / tag)
        if not all_ranks_true(problem is None, dist):
            if dist.is_main:
                print(f"warning: --resume: skipping checkpoint {tag}: {problem or 'damaged on another rank'}",
                      file=sys.stderr)
            continue
        mine = torch.load(ckpt / tag / resume_file(dist.rank), map_location="cpu", weights_only=True)
        if not engine.load_checkpoint(str(ckpt), tag):
            raise ConfigError(f"--resume: DeepSpeed could not load {ckpt / tag}")
        return tag_step(tag), mine
    raise ConfigError(f"--resume: no usable checkpoint in {ckpt}")
