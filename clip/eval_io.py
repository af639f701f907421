"""Inputs and outputs of :mod:`clip.eval`: the checkpoint and its tokenizer, image folders,
class-name files, parallel text pairs, and the charts (matplotlib, Agg backend)."""
from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


# ----------------------------------------------------------------------------- inputs

def load_model_and_tokenizer(checkpoint: str, tokenizer_dir: str | None = None, device="cpu"):
    """A CLIP from ``clip_ckpt.pt`` or a run folder, and its tokenizer (default: ``tokenizer/`` beside it)."""
    from clip.model import load_clip
    from tokenizer import BilingualTokenizer

    path = Path(checkpoint)
    ckpt = path / "clip_ckpt.pt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {ckpt}")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else ckpt.parent / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found: {tok_dir} (pass --tokenizer DIR)")
    tokenizer = BilingualTokenizer.from_dir(str(tok_dir))
    model = load_clip(str(ckpt)).to(device).eval()
    vocab = getattr(getattr(getattr(model, "cfg", None), "text", None), "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer {tok_dir} has {tokenizer.vocab_size} tokens, "
                         f"the model's text tower {vocab}")
    return model, tokenizer


def image_folder_samples(root: str) -> tuple[list[dict], list[str]]:
    """Samples ``{"path", "file", "label"}`` of an image folder whose subfolder names are the classes."""
    from mae.data import list_images
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
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class-name file not found: {p}")
    if p.suffix.lower() == ".json":
        try:
            table = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
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
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"parallel file not found: {p}")
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


# ----------------------------------------------------------------------------- outputs

def plot_accuracy_at_k(series: Mapping[str, Mapping[str, float]], path, title: str) -> None:
    """Grouped bars: accuracy@k (k on the x axis) for each series (language or direction)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    ks = sorted({int(k) for acc in series.values() for k in acc})
    width = 0.8 / max(1, len(series))
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for j, (name, acc) in enumerate(series.items()):
        offset = (j - (len(series) - 1) / 2) * width  # series side by side around each k
        ax.bar([k + offset for k in ks], [acc[str(k)] for k in ks], width, label=name)
    ax.set(xlabel="k", ylabel="accuracy@k", title=title, ylim=(0, 1), xticks=ks)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_rank_boxplot(series: Mapping[str, torch.Tensor], path, title: str) -> None:
    """Box plot of the 1-based ranks of each series on a log-scale y axis (1 = best)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.boxplot([r.numpy() for r in series.values()], showmeans=True)
    ax.set_xticks(range(1, len(series) + 1), list(series))
    ax.set_yscale("log")
    ax.set(ylabel="rank of the correct item (1 = best)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(header: list[str], rows: list[list]) -> None:
    """A right-aligned text table on stdout (floats with 4 decimals)."""
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
