"""Image-caption pairs for stage 2 (CLIP): captions, the pair stream, its collate, a keyed split.

Sources are those of :mod:`mae.images.sources` (folder of ``.tar`` shards, brace pattern, one ``.tar``,
``.jsonl`` manifest or a list of :func:`mae.images.sources.iter_manifest` rows), the stream and its
sharding that of :mod:`mae.images.stream`, the shard format :mod:`mae.images.shards`.

Captions, per configured language (order of ``languages``):
  * manifest rows / shard ``{key}.json``: ``obj["captions"][lang]`` if present, else ``obj[lang]``;
    each a string or a list of strings (the emoji rows use ``row["en"]``, ``row["ko"]``);
  * shard ``{key}.txt``: one caption in ``languages[0]``, used only when the ``.json`` gave none in
    that language (so img2dataset's caption.txt works, and our writer's ``.txt`` is no duplicate).
A caption that is not a string, empty or whitespace-only after ``strip()``, or not valid UTF-8
is dropped and counted (``n_dropped`` of its sample). A sample left with no caption in any
configured language is skipped and counted in ``n_skipped`` (its dropped captions are not added
to ``n_dropped``), as is an undecodable image.

Train/val without files: ``rows = list(iter_manifest(m)); train, val = split_rows(rows, 0.15)``,
then ``PairDataset(train, views)``.

Writing such shards from a manifest: :mod:`clip.data.shards` (``python -m clip.shards --help``).

Legend: B images in the batch, C caption slots per image, T tokens, V crops per image.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch.utils.data import get_worker_info

from clip.data.curation.online import caption_sources, draw_caption
from mae.images.stream import ShardedImageSource, batch_position


# ----------------------------------------------------------------------------- captions
def clean_caption(text) -> str | None:
    """``text.strip()`` if it is a non-empty, valid-UTF-8 string, else None."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text:
        return None
    try:
        text.encode("utf-8")  # lone surrogates: invalid bytes read with surrogateescape
    except UnicodeEncodeError:
        return None
    return text


def extract_captions(obj: dict, languages: Sequence[str]) -> tuple[dict[str, list[str]], int]:
    """Valid captions ``{lang: [str, ...]}`` (languages without any are absent) and the number
    of dropped ones, from ``obj["captions"][lang]`` or else ``obj[lang]``."""
    nested = obj.get("captions") if isinstance(obj.get("captions"), dict) else {}
    out, dropped = {}, 0
    for lang in languages:
        val = nested.get(lang, obj.get(lang))
        if val is None:
            continue
        good = []
        for v in (val if isinstance(val, list) else [val]):
            c = clean_caption(v)
            if c is None:
                dropped += 1
            else:
                good.append(c)
        if good:
            out[lang] = good
    return out, dropped


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


# ----------------------------------------------------------------------------- dataset
class PairDataset(ShardedImageSource):
    """Yields ``{"image", "captions": {lang: [str]}, "key", "n_dropped"}`` plus the stream's
    bookkeeping (``n_skipped``, ``n_broken_shards``, ``worker``, ``pos``: :class:`mae.images.stream.ShardedImageSource`).

    Args:
        source: shards (brace pattern, ``.tar``, folder of ``.tar``), a ``.jsonl`` / ``.csv``
            manifest, or a list of manifest rows (e.g. one side of :func:`split_rows`).
        views: encoded image -> sample (``clip.data.multicrop.build_multicrop``, or
            :class:`mae.images.decode.Decoded` around a transform of decoded images).
        languages: caption languages to keep; the first is the language of ``{key}.txt``.
        rank, world_size, seed, shuffle, shuffle_buffer, resampled, weights, num_samples: the stream.
    """

    def __init__(self, source, views, languages: Sequence[str] = ("en", "ko"), **kw):
        super().__init__(source, **kw)
        if not languages:
            raise ValueError("languages must not be empty")
        if self.kind == "records" and not any("row" in r for r in self.items):
            raise ValueError(f"pair dataset needs captions: {source} is a plain image folder")
        self.views, self.languages = views, tuple(languages)

    def captions(self, record: dict) -> tuple[str, dict[str, list[str]], int, dict[str, list[str]]]:
        """(key, captions, n_dropped, where each caption came from) of a raw record (the sources:
        :func:`clip.data.curation.online.caption_sources`)."""
        if "row" in record:
            caps, dropped = extract_captions(record["row"], self.languages)
            return record["key"], caps, dropped, caption_sources(record["row"], caps)
        key, caps, dropped, meta = record["key"], {}, 0, {}
        if record.get("json") is not None:
            try:
                meta = json.loads(_decode_text(record["json"]))
            except ValueError:
                meta, dropped = None, 1
            if isinstance(meta, dict):
                caps, dropped = extract_captions(meta, self.languages)
                key = str(meta.get("key", key))
            else:
                meta = {}
        first = self.languages[0]
        if record.get("txt") is not None and first not in caps:
            c = clean_caption(_decode_text(record["txt"]))
            if c is None:
                dropped += 1
            else:
                caps[first] = [c]
        return key, caps, dropped, caption_sources(meta, caps)

    def load(self, record):
        key, caps, dropped, sources = self.captions(record)
        if not caps:
            return None
        img = self.decode(record, self.views)
        if img is None:
            return None
        return {"image": img, "captions": caps, "caption_sources": sources, "key": key, "n_dropped": dropped}


def split_rows(rows: Sequence[dict], val_fraction: float, key_field: str = "base",
               seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train/val split: a row goes to val when the first 32 bits of
    ``sha1(f"{seed}:{row[key_field]}")`` / 2**32 < ``val_fraction``, so rows sharing a key
    (e.g. an emoji and its skin-tone variants) land on the same side. Row order is kept."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    train, val = [], []
    for i, row in enumerate(rows):
        if key_field not in row:
            raise ValueError(f"row {i} has no split key field {key_field!r}")
        digest = hashlib.sha1(f"{seed}:{row[key_field]}".encode("utf-8", "surrogateescape")).digest()
        (val if int.from_bytes(digest[:4], "big") / 2**32 < val_fraction else train).append(row)
    return train, val


# ----------------------------------------------------------------------------- collate
def _stack(images: list):
    """Lists of V crops (or single crops) per sample -> V crop batches (``views`` not given)."""
    if not isinstance(images[0], (list, tuple)):
        images = [[x] for x in images]
    return [torch.stack(v) for v in zip(*images)]


CaptionMode = Literal["all", "sample"]  # every language a positive, or one random caption per image


class CaptionCollate:
    """Batch pair samples and tokenize one caption per slot.

    ``mode="all"``: C = len(languages), slot c holds a random caption in ``languages[c]``; an
    image without that language gets ``text_mask`` False and a ``[SOT, EOT, PAD...]`` row.
    ``mode="sample"``: C = 1, a random available language, then a random caption in it
    (KELIP-style mixed batches); ``languages`` is then ``["mixed"]``. With ``caption_weights``
    (``data.caption_weights``) the caption is drawn by its variant's weight instead
    (:func:`clip.data.curation.online.draw_caption`: original and translated captions, per language).
    Draws come from a generator seeded by (seed, epoch, and where the batch ends in the stream:
    worker and position), so they do not depend on earlier batches and a resumed run draws the
    same; call ``set_epoch`` before each epoch for fresh draws.

    Returns ``{"images": views.collate(...) (without ``views``: V crop batches), "tokens": (B,C,T) long,
    "text_mask": (B,C) bool,
    "languages": [C str], "slot_languages": B x C lists ("" where masked), "captions": B x C caption
    texts ("" where masked), "keys": [B str],
    "n_dropped": int}`` plus :func:`mae.images.stream.batch_position`'s fields.
    """

    def __init__(self, tokenizer, views=None, languages: Sequence[str] = ("en", "ko"), mode: CaptionMode = "all",
                 seed: int = 0, context_length: int | None = None, caption_weights: dict[str, float] | None = None):
        if mode not in get_args(CaptionMode):
            raise ValueError(f"mode must be one of {get_args(CaptionMode)}, got {mode!r}")
        self.tokenizer, self.views, self.languages, self.mode, self.seed = tokenizer, views, tuple(languages), mode, seed
        self.context_length = context_length or tokenizer.context_length  # the text tower's T
        self.caption_weights = dict(caption_weights or {})
        self.epoch, self._calls = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._calls = epoch, 0

    def _rng(self, last: dict) -> random.Random:
        if last.get("pos") is not None:
            return random.Random(f"{self.seed}:{self.epoch}:{last.get('worker')}:{last['pos']}")
        info = get_worker_info()  # samples from elsewhere: a per-call stream
        self._calls += 1
        return random.Random(f"{self.seed}:{self.epoch}:{info.id if info else -1}:call{self._calls}")

    def __call__(self, samples: list[dict]) -> dict:
        rng = self._rng(samples[-1])
        B, images = len(samples), [s["image"] for s in samples]
        texts, slots, captions = [], [], []  # slots: (B, C) language per slot, "" = masked; captions: its text
        for s in samples:
            caps = s["captions"]
            if self.mode == "all":
                row = [lang if caps.get(lang) else "" for lang in self.languages]
                texts += [rng.choice(caps[lang]) for lang in row if lang]
            elif self.caption_weights:  # a variant by its weight, then one of its captions
                got = draw_caption({lang: caps[lang] for lang in self.languages if caps.get(lang)},
                                   self.caption_weights, rng, s.get("caption_sources"))
                row = [got[0] if got else ""]
                texts += [got[1]] if got else []
            else:
                row = [rng.choice([lang for lang in self.languages if caps.get(lang)] or [""])]
                texts += [rng.choice(caps[lang]) for lang in row if lang]
            n = sum(bool(lang) for lang in row)
            it = iter(texts[len(texts) - n:])  # this row's texts, in slot order
            slots.append(row)
            captions.append([next(it) if lang else "" for lang in row])
        C = len(slots[0])
        mask = torch.tensor([[bool(lang) for lang in row] for row in slots], dtype=torch.bool)  # (B, C)
        T = self.context_length
        enc = self.tokenizer.encode_batch(texts, context_length=T) if texts else None  # (N_valid, T), one call
        tokens = torch.full((B * C, T), self.tokenizer.pad_id, dtype=torch.long)
        tokens[:, 0], tokens[:, 1] = self.tokenizer.sot_id, self.tokenizer.eot_id  # empty caption row
        if enc is not None:
            tokens[mask.view(-1)] = enc.long()
        return {
            "images": self.views.collate(images) if self.views is not None else _stack(images),
            "tokens": tokens.view(B, C, T),  # (B, C, T)
            "text_mask": mask,
            "languages": list(self.languages) if self.mode == "all" else ["mixed"],
            "slot_languages": slots,
            "captions": captions,
            "keys": [s["key"] for s in samples],
            "n_dropped": sum(int(s.get("n_dropped", 0)) for s in samples),
            **batch_position(samples),
        }
