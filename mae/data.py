"""Image streams for stage 1 (MAE) and, through subclassing, stage 2 (CLIP pairs).

A *source* is one of
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
    several sources joined by ``::`` (mixed; weighted when resampling, ``mae.dataset``).

The stream over a source (partitioned over ranks and workers, reshuffled per epoch, resumable,
skip-counting) is :mod:`mae.dataset`.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, ImageOps

from mae.shards import expand_shards, looks_like_shards

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# OpenAI CLIP's pixel statistics. Both stages normalise with them, so the encoder sees the same
# pixel distribution in MAE pretraining and in CLIP training.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- images
def load_rgb(src: str | os.PathLike | bytes) -> Image.Image:
    """Decode a path or encoded bytes into an RGB image; any transparency is flattened onto white.

    Raises whatever PIL raises for unreadable, truncated or empty input (callers that must not
    crash catch it and count a skip).
    """
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with Image.open(fp) as img:
        img.load()  # decode now: truncated data raises here, not later in a transform
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image of any mode (P, RGBA, LA, L, CMYK, ...) as :func:`load_rgb` returns it: the
    EXIF orientation applied, transparency flattened onto white, converted to RGB. The one rule for
    every image the models see (training loaders, the fast crops, evaluation, ``preprocess``)."""
    if img.getexif().get(0x0112, 1) != 1:  # camera JPEGs: apply the EXIF orientation
        img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def mae_transform(
    img_size: int = 224,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
    scale: tuple[float, float] = (0.2, 1.0),
) -> "torchvision.transforms.v2.Compose":
    """MAE pre-training augmentation (He et al. 2022): random resized crop (bicubic) + flip."""
    from torchvision.transforms import v2  # lazy: the shard-writer CLI needs no torchvision

    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> "torchvision.transforms.v2.Compose":
    """The deterministic view: shorter side to ``size`` (bicubic), center ``size`` x ``size`` crop, normalise."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.ToImage(),
        v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


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
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="surrogateescape").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file"), str):
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
