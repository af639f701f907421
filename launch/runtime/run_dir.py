"""The run folder: refused or prepared before any work, its identity, and what its end says.

``run.out_dir`` holds ``config.yaml`` (the resolved config), ``ds_config.json``, ``metrics.jsonl``,
``tb/``, the stage's outputs and ``checkpoints/`` (:mod:`launch.runtime.checkpoints`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from launch.runtime import checkpoints
from launch.runtime.config import ConfigError, RunConfig, save_config, to_dict
from launch.runtime.dist import Dist, barrier
from mae.common.files import atomic_write_text


def check_run_dir(out_dir: str, resume: bool) -> Path:
    """Refuse, before any process work, an output folder that cannot be written, one that holds a
    run when ``--resume`` is not given (a restart must never overwrite a run), and ``--resume``
    into a folder without checkpoints."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f".write_test.{os.getpid()}", "w") as f:
            f.write("ok")
        os.unlink(out / f".write_test.{os.getpid()}")
    except OSError as e:
        raise ConfigError(f"run.out_dir={out_dir}: cannot write there ({e.strerror or e})") from None
    existing = checkpoints.describe_run(out)
    if not resume and existing:
        raise ConfigError(f"run.out_dir={out_dir} already holds a run ({existing}); continue it with --resume, "
                          "or choose another run.out_dir")
    if resume and not checkpoints.tags_by_step(out / "checkpoints"):
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    return out


def prepare_run_dir(run: RunConfig, cfg: Any, dist: Dist, extra: Optional[dict] = None) -> Path:
    """Create ``run.out_dir`` on rank 0 with ``config.yaml``, ``checkpoints/`` and the JSON files of
    ``extra`` (name -> object, e.g. ``ds_config.json``)."""
    out = Path(run.out_dir)
    if dist.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        for name, obj in (extra or {}).items():
            atomic_write_text(out / name, json.dumps(obj, indent=2, ensure_ascii=False))
    barrier(dist)
    return out


def fingerprint(cfg: Any) -> str:
    """First 16 hex digits of the sha256 of a config (as sorted JSON)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def summary_line(totals: dict[str, float]) -> str:
    """The run's data counts for the console: skipped samples, broken shards, partial batches."""
    names = {"skipped_samples": "samples skipped (missing, undecodable or without a caption)",
             "broken_shards": "broken shards", "samples_in_partial_batches": "samples in partial batches (not trained on)",
             "dropped_captions": "captions dropped (empty or invalid)"}
    return "data: " + ", ".join(f"{int(totals.get(k, 0))} {v}" for k, v in names.items() if k in totals or k != "dropped_captions")
