"""The first pass: read a unit of the source (one shard, or a slice of a manifest), identify each
caption's language, match it against the metadata, hash the image, count, and keep what the
later steps need in a per-unit index. Units are independent, so the pass runs shard-parallel
and the counts merge by addition.

A unit's index (``{work}/{unit:06d}.npz``, S samples, C captions, M matches):
  ``keys`` (S,) str; ``cap_offsets`` (S+1,) sample -> its captions; ``cap_lang`` (C,) index into
  the curated languages; ``cap_hash`` (C,) 64-bit digest of (language, normalised text);
  ``match_offsets`` (C+1,) caption -> its matches; ``match_ids`` (M,) entry ids of the caption's
  language; ``img_hash`` (S,) digest of the image bytes (0: no image); ``phash``, ``colour``,
  ``has_phash`` (S,) the near-duplicate signature.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from clip.data.curation.dedup import digest64, image_signature
from clip.data.curation.langid import LanguageIdentifier
from clip.data.curation.metadata import Matcher, normalize_many
from mae.images.keep import unit_name

RECORDS_PER_UNIT = 10_000


@dataclass(frozen=True)
class ScanSettings:
    """What a worker needs for the first pass (picklable: sent once to each process)."""

    languages: tuple[str, ...]
    candidates: tuple[str, ...]
    mislabelled: str
    entries: dict[str, list[str]] = field(repr=False)
    work: str
    near_dup: bool = True
    fingerprint: str = ""  # identifies the settings across processes (rebuild the matchers only when it changes)


@dataclass(frozen=True)
class Unit:
    """One shard URL, or a slice of manifest records (``records``)."""

    index: int
    url: str | None = None
    records: tuple = ()

    @property
    def name(self) -> str:
        """The unit's name in keep files and written shards: the shard's last two path parts
        (``crawl/000001``), or ``records-000003`` for a manifest slice."""
        return f"records-{self.index:06d}" if self.url is None else unit_name(self.url)


def make_units(kind: str, items: list) -> list[Unit]:
    """Units over a resolved source (:func:`mae.images.sources.resolve_source`)."""
    if kind == "shards":
        return [Unit(i, url=u) for i, u in enumerate(items)]
    return [Unit(i, records=tuple(items[s : s + RECORDS_PER_UNIT]))
            for i, s in enumerate(range(0, len(items), RECORDS_PER_UNIT))]


# ----------------------------------------------------------------------------- reading
def _decode_json(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        meta = json.loads(data.decode("utf-8", errors="surrogateescape"))
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def read_unit(unit: Unit, filed: Sequence[str]) -> Iterator[dict]:
    """``{"key", "image" (bytes or None), "captions" {lang: [str]}, "meta" (dict), "path"}`` per
    sample, captions read as :class:`clip.data.pairs.PairDataset` reads them, over the languages
    ``filed`` (a ``.txt`` member counts as ``filed[0]``)."""
    from clip.data.pairs import clean_caption, extract_captions

    if unit.url is not None:
        from mae.images.shards import iter_shard_samples

        for s in iter_shard_samples(unit.url):
            meta = _decode_json(s["json"]) or {}
            caps, _ = extract_captions(meta, filed)
            if s["txt"] is not None and filed[0] not in caps:
                c = clean_caption(s["txt"].decode("utf-8", errors="surrogateescape"))
                if c is not None:
                    caps[filed[0]] = [c]
            yield {"key": s["key"], "image": s["image"], "captions": caps, "meta": meta, "path": None}
        return
    for r in unit.records:
        row = r.get("row", {})
        caps, _ = extract_captions(row, filed)
        try:
            with open(r["path"], "rb") as f:
                image = f.read()
        except OSError:
            image = None
        meta = {k: v for k, v in row.items() if k != "path"}
        yield {"key": r["key"], "image": image, "captions": caps, "meta": meta, "path": r["path"]}


# ----------------------------------------------------------------------------- the pass
_STATE: dict = {}


def worker_state(settings: ScanSettings) -> tuple[LanguageIdentifier, dict[str, Matcher]]:
    """The identifier and matchers of this process, built once per settings."""
    key = settings.fingerprint or id(settings)
    if _STATE.get("key") != key:
        _STATE.update(key=key, lid=LanguageIdentifier(settings.languages, settings.candidates, settings.mislabelled),
                      matchers={lang: Matcher(settings.entries[lang]) for lang in settings.languages})
    return _STATE["lid"], _STATE["matchers"]


def sample_captions(sample: dict, lid: LanguageIdentifier, settings: ScanSettings,
                    stats: dict) -> list[tuple[int, str]]:
    """A sample's captions after language identification, as ``(language index, text)`` in a
    fixed order (language order, then caption order) that the writing pass reproduces."""
    checked = lid.check(sample["captions"], stats)
    return [(i, t) for i, lang in enumerate(settings.languages) for t in checked.get(lang, [])]


def index_path(work: str, unit: Unit) -> str:
    return os.path.join(work, f"{unit.index:06d}.npz")


def scan_unit(unit: Unit, settings: ScanSettings) -> dict:
    """Pass 1 over one unit: writes its index (module docstring) and returns ``{"unit",
    "counts": {lang: (E,) int64 matches per entry}, "stats": {...}}`` (``captions_{lang}``: the
    captions after language ID)."""
    from mae.common.files import atomic_open

    lid, matchers = worker_state(settings)
    stats = {"samples": 0, "captions_filed": 0, "no_image": 0, "undecodable": 0}
    keys, cap_offsets, cap_lang, texts = [], [0], [], []
    img_hash, phash, colour, has_phash = [], [], [], []
    filed = tuple(dict.fromkeys([*settings.languages, *lid.candidates]))
    for s in read_unit(unit, filed):
        stats["samples"] += 1
        stats["captions_filed"] += sum(len(v) for v in s["captions"].values())
        caps = sample_captions(s, lid, settings, stats)
        keys.append(str(s["key"]))
        for li, text in caps:
            cap_lang.append(li)
            texts.append(text)
        cap_offsets.append(len(cap_lang))
        data, ph, co, ok = s["image"], 0, 0, False
        if data is None:
            stats["no_image"] += 1
        elif settings.near_dup:
            try:
                ph, co = image_signature(data)
                ok = True
            except Exception:  # PIL raises many types for bad data; counted, never merged
                stats["undecodable"] += 1
        img_hash.append(digest64(data) if data is not None else 0)
        phash.append(ph)
        colour.append(co)
        has_phash.append(ok)
    cap_lang_a = np.asarray(cap_lang, dtype=np.int64)
    cap_hash = [digest64(f"{settings.languages[li]}\0{t}".encode("utf-8", "surrogatepass"))
                for li, t in zip(cap_lang, normalize_many(texts))]
    match_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    match_ids = np.zeros(0, dtype=np.int64)
    counts, per_caption, id_parts = {}, np.zeros(len(texts), dtype=np.int64), {}
    for li, lang in enumerate(settings.languages):
        sel = np.flatnonzero(cap_lang_a == li)
        offs, ids = matchers[lang].match([texts[i] for i in sel])
        per_caption[sel] = np.diff(offs)
        id_parts[li] = (sel, offs, ids)
        counts[lang] = np.bincount(ids, minlength=len(matchers[lang])).astype(np.int64)
    match_offsets[1:] = np.cumsum(per_caption)
    match_ids = np.zeros(int(match_offsets[-1]), dtype=np.int64)
    for sel, offs, ids in id_parts.values():  # scatter each language's CSR into caption order
        n = np.diff(offs)
        match_ids[np.repeat(match_offsets[sel] - offs[:-1], n) + np.arange(len(ids))] = ids
    with atomic_open(index_path(settings.work, unit), "wb") as f:
        np.savez(f, keys=np.asarray(keys, dtype=str), cap_offsets=np.asarray(cap_offsets, dtype=np.int64),
                 cap_lang=cap_lang_a, cap_hash=np.asarray(cap_hash, dtype=np.uint64), match_offsets=match_offsets,
                 match_ids=match_ids, img_hash=np.asarray(img_hash, dtype=np.uint64),
                 phash=np.asarray(phash, dtype=np.uint64), colour=np.asarray(colour, dtype=np.uint64),
                 has_phash=np.asarray(has_phash, dtype=bool))
    stats["captions"] = len(texts)
    stats.update({f"captions_{lang}": int((cap_lang_a == i).sum()) for i, lang in enumerate(settings.languages)})
    return {"unit": unit.index, "counts": counts, "stats": stats}


def load_index(work: str, unit: Unit, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A unit's index, or only the arrays ``names``."""
    with np.load(index_path(work, unit), allow_pickle=False) as z:
        return {k: z[k] for k in (names or z.files)}
