"""Parallel sentences for text-only distillation: read, split, streamed and batched.

A source is one of
  * a ``.tsv`` / ``.csv`` table with a header naming one column per language (``en``, ``ko``; other
    columns kept as fields), e.g. ``data/parallel/en_ko.tsv``;
  * a ``.jsonl`` file, one object a line with a string (or a list: its first string) per language,
    e.g. the emoji manifest ``data/emoji/captions.jsonl`` read as text;
  * line-aligned text files, one per language, named by a ``{lang}`` pattern: ``corpus/{lang}.txt``
    reads ``corpus/en.txt`` and ``corpus/ko.txt`` line by line (their line counts must agree);
  * several of these joined by ``::``.
A row lacking a language (missing, empty or whitespace-only after ``strip()``) is dropped and counted.

The stream (:class:`TextPairSource`) is the image stream's (:class:`mae.images.stream.ShardedImageSource`
over records: partitioned over ranks and DataLoader workers, reshuffled per epoch, each item with its
``worker`` / ``pos``), so :class:`launch.runtime.stream.BatchStream` resumes it at the exact pair.

Legend: B pairs in the batch, L languages, T tokens.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch

from clip.data.pairs import clean_caption, split_rows
from mae.common.files import iter_jsonl
from mae.images.stream import ShardedImageSource, batch_position


def _table(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        tsv = path.suffix == ".tsv"
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        return [{k: v for k, v in row.items() if k is not None} for row in reader]


def _jsonl(path: Path) -> list[dict]:
    return [{k: (v[0] if isinstance(v, list) and v else v) for k, v in row.items()} for _, row in iter_jsonl(path)]


def _line_files(pattern: str, languages: Sequence[str]) -> list[dict]:
    lines = {}
    for lang in languages:
        p = Path(pattern.replace("{lang}", lang))
        if not p.is_file():
            raise FileNotFoundError(f"parallel text file not found: {p}")
        lines[lang] = p.read_text(encoding="utf-8").splitlines()
    counts = {lang: len(v) for lang, v in lines.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{pattern}: line-aligned files differ in length ({counts})")
    return [dict(zip(lines, t)) for t in zip(*lines.values())]


def read_pairs(source: str, languages: Sequence[str], resolve=lambda s: s) -> tuple[list[dict], int]:
    """``(rows, dropped)`` of a source (module docstring): each row a dict with a clean string per
    language (plus the file's other fields); ``resolve`` maps each ``::`` part to a path.
    FileNotFoundError / ValueError (one line naming the file)."""
    rows, dropped = [], 0
    for part in str(source).split("::"):
        path = resolve(part)
        if "{lang}" in path:
            raw = _line_files(path, languages)
        else:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"parallel data not found: {p}")
            if p.suffix in (".tsv", ".csv"):
                raw = _table(p)
                header = set(raw[0]) if raw else set()
                if raw and not set(languages) <= header:
                    raise ValueError(f"{p}: the header needs a column per language {list(languages)}, has "
                                     f"{sorted(header)}")
            elif p.suffix == ".jsonl":
                raw = _jsonl(p)
            else:
                raise ValueError(f"{p}: parallel data must be .tsv, .csv, .jsonl or a '{{lang}}' pattern of text files")
        for row in raw:
            texts = {lang: clean_caption(row.get(lang)) for lang in languages}
            if all(texts.values()):
                rows.append({**row, **texts})
            else:
                dropped += 1
    return rows, dropped


def split_pairs(rows: list[dict], val_fraction: float, key: str, seed: int,
                language: str) -> tuple[list[dict], list[dict]]:
    """Train / held-out rows by :func:`clip.data.pairs.split_rows` on ``row[key]`` (else the
    ``language`` sentence, so every translation of a sentence falls on one side): with the emoji
    manifest and ``key="base"`` the held-out rows are the CLIP stage's held-out emoji."""
    for r in rows:
        r["_split"] = (r.get(key) or r[language]) if key else r[language]
    return split_rows(rows, val_fraction, "_split", seed)


class TextPairSource(ShardedImageSource):
    """Yields ``{"texts": [str per language], "target": int}`` plus the stream's bookkeeping
    (``n_skipped``, ``n_broken_shards``, ``worker``, ``pos``).

    Args:
        rows: parallel rows (:func:`read_pairs`), each with ``target``: the index of its
            teacher-language sentence in the list of distinct ones (what a cache of the teacher's
            embeddings is indexed by).
        languages: the languages of ``texts``, in order.
        rank, world_size, seed, shuffle: the stream (:class:`mae.images.stream.ShardedImageSource`).
    """

    def __init__(self, rows: Sequence[dict], languages: Sequence[str], **kw):
        super().__init__([{"path": f"pair:{i}", "key": f"pair:{i}", "texts": [r[lang] for lang in languages],
                           "target": int(r["target"])} for i, r in enumerate(rows)], **kw)
        self.languages = tuple(languages)

    def load(self, record: dict) -> dict:
        row = record["row"]
        return {"texts": row["texts"], "target": row["target"]}


def distinct_targets(rows: list[dict], language: str) -> list[str]:
    """The distinct ``language`` sentences of ``rows`` in first-seen order; sets each row's
    ``target`` to its index there."""
    index: dict[str, int] = {}
    for r in rows:
        r["target"] = index.setdefault(r[language], len(index))
    return list(index)


class TextPairCollate:
    """A batch of :class:`TextPairSource` items: ``{"tokens": (L, B, T) long, "texts": L lists of B
    strings, "target": (B,) long}`` plus :func:`mae.images.stream.batch_position`'s fields. Nothing is
    drawn at random: a resumed run batches the same.

    Args:
        tokenizer: the student's (``encode_batch(texts, context_length)``).
        context_length: the student tower's T.
    """

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, samples: list[dict]) -> dict:
        texts = [list(t) for t in zip(*(s["texts"] for s in samples))]  # L lists of B
        flat = [t for lang in texts for t in lang]
        tokens = self.tokenizer.encode_batch(flat, context_length=self.context_length).long()  # (L*B, T)
        return {"tokens": tokens.view(len(texts), len(samples), -1), "texts": texts,
                "target": torch.tensor([s["target"] for s in samples], dtype=torch.long), **batch_position(samples)}
