"""Where the images of both stages come from: a *source* string resolved into records or shards.

A source is one of
  * an image folder (searched recursively for .jpg/.jpeg/.png/.webp, sorted by path),
  * a ``.jsonl`` manifest, one ``{"file": ...}`` object a line, ``file`` relative to the
    manifest's folder (``data/emoji/captions.jsonl`` is one), or a ``.csv`` / ``.tsv`` table
    with an image column and one caption column per language (:func:`iter_table`),
  * a list of manifest rows as returned by :func:`iter_manifest` (each with an absolute
    ``"path"``), so a trainer can split a manifest without writing files,
  * WebDataset shards in img2dataset layout (members ``{key}.jpg|jpeg|png|webp``, optionally
    ``{key}.json`` / ``{key}.txt``): a brace pattern ``dir/{000000..000009}.tar``, one ``.tar``,
    or a folder of ``.tar`` files (a folder holding any ``.tar`` is read as shards); remote shards
    as ``pipe:COMMAND`` (e.g. ``pipe:aws s3 cp s3://b/{000000..000099}.tar -``) or http(s) URLs;
    several sources joined by ``::`` (mixed; weighted when resampling, ``mae.images.stream``).

The stream over a source (partitioned over ranks and workers, reshuffled per epoch, resumable,
skip-counting) is :mod:`mae.images.stream`.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from mae.common.files import iter_jsonl
from mae.images.decode import IMAGE_EXTS
from mae.images.shards import expand_shards, looks_like_shards


# ----------------------------------------------------------------------------- sources
def iter_manifest(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the rows of a JSONL manifest in file order, each with ``"path"``: the absolute
    image path (``file`` resolved against the manifest's folder). Blank lines are ignored.

    Raises FileNotFoundError for a missing manifest, ValueError naming file and line for a line
    that is not a JSON object with a string ``file``. Text is decoded with ``surrogateescape`` so
    invalid UTF-8 inside a caption surfaces as a string that caption cleaning drops.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.resolve().parent
    for lineno, row in iter_jsonl(path):
        if not isinstance(row.get("file"), str):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'file'")
        row["path"] = str(root / row["file"])
        yield row


TABLE_IMAGE_COLUMNS = ("file", "filepath", "image", "image_path", "path")


def iter_table(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a CSV (``.csv``) or tab-separated (``.tsv``) table with a header, as manifest rows:
    the image column is the first of ``file``, ``filepath`` (open_clip's ``--csv-img-key``
    default), ``image``, ``image_path``, ``path``, relative to the table's folder; every other
    column is a field, so captions sit in columns named by language (``en``, ``ko``, ...).
    Raises FileNotFoundError / ValueError (naming the file) like :func:`iter_manifest`."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    root = path.resolve().parent
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        column = next((c for c in TABLE_IMAGE_COLUMNS if c in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"{path}: no image column (one of {', '.join(TABLE_IMAGE_COLUMNS)}) in the header "
                             f"{reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            if not row.get(column):
                raise ValueError(f"{path}:{lineno}: empty {column!r}")
            row = {k: v for k, v in row.items() if k is not None}
            row["file"] = row[column]
            row["path"] = str(root / row[column])
            yield row


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All images under ``folder`` (recursive, case-insensitive extensions), sorted by path."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def resolve_source(source: str | os.PathLike | list) -> tuple[str, list]:
    """Classify ``source`` into ``("records", [record, ...])`` or ``("shards", [url, ...])``.

    A record is a dict with ``"key"`` and ``"path"`` (plus ``"row"`` for manifest rows).
    """
    if isinstance(source, (list, tuple)):
        records = []
        for i, row in enumerate(source):
            if isinstance(row, (str, os.PathLike)):
                records.append({"key": str(row), "path": str(row)})
            elif isinstance(row, dict) and "path" in row:
                records.append({"key": str(row.get("key", row["path"])), "path": row["path"], "row": row})
            else:
                raise ValueError(f"row {i}: expected a path or a manifest row with 'path' "
                                 "(see iter_manifest)")
        return "records", records
    source = str(source)
    if looks_like_shards(source):
        return "shards", expand_shards(source)
    if source.endswith((".jsonl", ".csv", ".tsv")):
        rows = iter_manifest(source) if source.endswith(".jsonl") else iter_table(source)
        return "records", [{"key": str(r.get("key", r["file"])), "path": r["path"], "row": r} for r in rows]
    if os.path.isdir(source):
        if any(Path(source).glob("*.tar")):  # img2dataset output, or ours
            return "shards", expand_shards(source)
        files = list_images(source)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) or .tar shards in {source}")
        return "records", [{"key": p.relative_to(source).as_posix(), "path": str(p)} for p in files]
    raise FileNotFoundError(f"image source not found: {source}")
