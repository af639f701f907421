"""Write WebDataset shards (format: :mod:`mae.images.shards`) from a caption manifest or an image folder.

    python -m clip.shards --manifest pairs.jsonl --out shards/ [--shard-size 1000] [--languages en ko]
    python -m clip.shards --images photos/ --out shards/          # images only, for MAE
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from clip.data.pairs import extract_captions, split_rows
from mae.common.files import atomic_write_text
from mae.images.sources import resolve_source
from mae.images.shards import STATS_FILE, prepare_shard_folder, write_shard_folder


def write_shards(source, out_dir, shard_size: int = 1000, languages: Sequence[str] = ("en", "ko"),
                 val_fraction: float = 0.0, split_key: str = "base", seed: int = 0,
                 overwrite: bool = False) -> dict:
    """Write shards (format: :mod:`mae.images.shards`) from a manifest (or row list) or a plain image folder.

    For manifests each sample also gets ``{key}.json`` (``{"captions": {lang: [...]}, ...}`` plus
    the row's other fields, caption fields moved into ``captions``) and ``{key}.txt`` (the first
    caption in ``languages[0]``, when there is one); the row's own ``key`` stays in the json.
    With ``val_fraction > 0`` rows are split by :func:`split_rows` into ``out/train`` and
    ``out/val``. Each shard folder gets ``stats.json``. Returns the stats per split.

    Errors (raised, nothing written): missing manifest, bad JSON line (with its line number),
    a missing image file, shards as input, existing shards in ``out`` unless ``overwrite``.
    Skipped and counted: undecodable images, rows without a valid caption; dropped and counted:
    invalid captions.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    kind, records = resolve_source(source)
    if kind == "shards":
        raise ValueError(f"clip.data.shards reads a manifest or an image folder, not shards: {source}")
    for r in records:
        if not os.path.isfile(r["path"]):
            raise FileNotFoundError(f"image not found: {r['path']} (row key {r['key']!r})")
    captioned = all("row" in r for r in records)
    out = Path(out_dir)
    if val_fraction > 0:
        if not captioned:
            raise ValueError("--val-fraction needs a manifest (rows with a split key)")
        train, val = split_rows([r["row"] for r in records], val_fraction, split_key, seed)
        val_ids = {id(row) for row in val}
        splits = {"train": [r for r in records if id(r["row"]) not in val_ids],
                  "val": [r for r in records if id(r["row"]) in val_ids]}
    else:
        splits = {"": records}
    for name in splits:
        prepare_shard_folder(out / name, overwrite)

    summary = {"source": str(source) if not isinstance(source, list) else "<rows>",
               "languages": list(languages), "shard_size": shard_size}
    per_split = {}
    for name, recs in splits.items():
        stats = {**summary, "skipped_no_caption": 0, "dropped_captions": 0}

        def caption_members(r, stats=stats):
            caps, dropped = extract_captions(r["row"], languages)
            stats["dropped_captions"] += dropped
            if not caps:
                stats["skipped_no_caption"] += 1
                return None
            meta = {k: v for k, v in r["row"].items() if k not in ("path", "captions", *languages)}
            meta["captions"] = caps
            extra = {"json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
            if languages[0] in caps:
                extra["txt"] = caps[languages[0]][0].encode("utf-8")
            return extra

        per_split[name or "all"] = write_shard_folder(recs, out / name, shard_size,
                                                      caption_members if captioned else None, stats)
    if val_fraction > 0:
        summary.update(val_fraction=val_fraction, split_key=split_key, seed=seed, splits=per_split)
        atomic_write_text(out / STATS_FILE, json.dumps(summary, indent=1, ensure_ascii=False))
    return per_split
