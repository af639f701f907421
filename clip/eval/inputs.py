"""Inputs of the evaluation: manifest rows (optionally one side of the train/val split), image
folders, class names and prompt templates, parallel text pairs.
Bad input raises FileNotFoundError or ValueError with a one-line message."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _read_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None


def image_folder_samples(root: str) -> tuple[list[dict], list[str]]:
    """Samples ``{"path", "file", "label"}`` of an image folder whose subfolder names are the classes."""
    from mae.images.sources import list_images
    root_p = Path(root)
    classes = sorted(d.name for d in root_p.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"image folder {root_p} has no class subfolders")
    samples = [{"path": str(f), "file": str(f.relative_to(root_p)), "label": c}
               for c in classes for f in list_images(root_p / c)]
    return samples, classes


def read_classnames(path: str, languages: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(labels, {lang: names}) from JSON ``{"en": {label: name}, "ko": {...}}`` or a TSV with header
    ``label en ko``. Every language must name every label."""
    p = _existing(path, "class-name file")
    if p.suffix.lower() == ".json":
        table = _read_json(p)
    else:
        with open(p, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if not rows or "label" not in rows[0]:
            raise ValueError(f"{p}: a TSV class-name file needs a header 'label {' '.join(languages)}'")
        table = {lang: {r["label"]: r[lang] for r in rows} for lang in languages if lang in rows[0]}
    missing = [lang for lang in languages if not isinstance(table.get(lang), dict)]
    if missing:
        raise ValueError(f"{p}: no class names for language(s) {missing}")
    labels = list(table[languages[0]])
    for lang in languages:
        names = table[lang]
        bad = [lab for lab in labels if not (isinstance(names.get(lab), str) and names[lab].strip())]
        bad += sorted(set(names) - set(labels))
        if bad:
            raise ValueError(f"{p}: {lang} names and {languages[0]} labels differ, e.g. {bad[:3]}")
    return labels, {lang: [table[lang][lab].strip() for lab in labels] for lang in languages}


def read_parallel(path: str, languages=("en", "ko"), normalize=None, max_pairs: int | None = None):
    """One-to-one pairs from a TSV with the two language columns in its header.

    Deduplication: empty pairs are dropped, then a pair is kept only if NEITHER side (compared after
    ``normalize``, e.g. the tokenizer's) was seen in an earlier kept pair, so the first occurrence
    wins and every text has exactly one right answer. Returns (pairs, n_dropped)."""
    p = _existing(path, "parallel file")
    normalize = normalize or str.strip
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not set(languages) <= set(reader.fieldnames or []):
            raise ValueError(f"{p}: header needs columns {list(languages)}, has {reader.fieldnames}")
        pairs, seen, dropped = [], [set(), set()], 0
        for row in reader:
            texts = [(row.get(lang) or "").strip() for lang in languages]
            keys = [normalize(t) for t in texts]
            if not all(keys) or keys[0] in seen[0] or keys[1] in seen[1]:
                dropped += 1
                continue
            seen[0].add(keys[0])
            seen[1].add(keys[1])
            pairs.append(tuple(texts))
            if max_pairs and len(pairs) == max_pairs:
                break
    return pairs, dropped


def load_rows(source: str, split: str = "all", val_fraction: float = 0.15, split_key: str = "base",
              seed: int = 0, max_rows: int | None = None, allow_folder: bool = False):
    """(rows, image root, split info, folder classes or None) of a JSONL manifest or an image folder.

    Args:
        source: a JSONL manifest (``mae.images.sources.iter_manifest``), or with ``allow_folder`` an image
            folder whose subfolders are the classes (always evaluated whole).
        split: ``all``, or the ``train`` / ``val`` side of ``clip.data.pairs.split_rows(rows, val_fraction,
            split_key, seed)`` (``val`` = the rows held out from training).
        max_rows: keep only the first rows after the split.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_dir():
        if not allow_folder:
            raise ValueError(f"this task needs a JSONL manifest, got the folder {path}")
        rows, classes = image_folder_samples(str(path))
        return rows, path, {"name": "all", "n_rows": len(rows)}, classes
    from clip.data.pairs import split_rows
    from mae.images.sources import iter_manifest
    rows, info = list(iter_manifest(path)), {"name": split}
    if split != "all":
        train, val = split_rows(rows, val_fraction, key_field=split_key, seed=seed)
        rows = val if split == "val" else train
        info.update(val_fraction=val_fraction, key=split_key, seed=seed)
    rows = rows[:max_rows] if max_rows else rows
    return rows, path.parent, {**info, "n_rows": len(rows)}, None


def class_names(rows: Sequence[dict], label_field: str, languages: Sequence[str], path: str | None = None,
                classes: Sequence[str] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """(labels, {lang: names}) for zero-shot: from the file ``path`` (see :func:`read_classnames`),
    which must name every row's ``row[label_field]``; without one, the labels (``classes`` or the
    rows' sorted labels) with ``-``/``_`` read as spaces, the same text in every language."""
    if path:
        labels, names = read_classnames(path, languages)
        unknown = sorted({r[label_field] for r in rows} - set(labels), key=str)
        if unknown:
            raise ValueError(f"label {unknown[0]!r} ({len(unknown)} unknown in all) is not in {path}")
        return labels, names
    labels = list(classes) if classes else sorted({r[label_field] for r in rows}, key=str)
    return labels, {lang: [str(lab).replace("-", " ").replace("_", " ") for lab in labels] for lang in languages}


def read_templates(path: str) -> dict[str, list[str]]:
    """Prompt templates ``{lang: ["a photo of a {}.", ...]}`` from a JSON file."""
    return _read_json(_existing(path, "template file"))
