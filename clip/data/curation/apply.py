"""The second pass: per unit, from its index and the merged counts, each sample's keep probability
(:mod:`clip.data.curation.balance`), written as the unit's keep file; optionally the kept samples
(one draw, :func:`~clip.data.curation.online.keep_draw` at epoch 0) written as a new shard with
their relabelled, deduplicated captions. Also what the report needs: per language, expected kept
captions and per-entry expected counts after curation.

Why a sample gets probability 0 (``drop`` codes, counted): :data:`DROP_REASONS`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from clip.data.curation.online import caption_sources
from mae.images.keep import FORMAT, keep_draw
from clip.data.curation.scan import ScanSettings, Unit, load_index, read_unit, sample_captions, worker_state

DROP_REASONS = ("kept", "no_caption", "no_image", "exact_duplicate", "near_duplicate", "duplicate_caption",
                "no_metadata_match")
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"RIFF", "webp"))


@dataclass(frozen=True)
class ApplySettings:
    """The merged result of the first pass that every unit's second pass reads."""

    scan: ScanSettings
    probs: dict  # lang -> (E,) entry probabilities
    unmatched_prob: float
    staging: str  # where keep files are written before they are moved into place
    shard_staging: str | None  # where new shards are written (None: none are)
    seed: int


def image_ext(data: bytes) -> str:
    """The member extension of encoded image bytes (jpg, png, webp)."""
    return next((ext for magic, ext in _IMAGE_MAGIC if data.startswith(magic)), "jpg")


def sample_probabilities(index: dict, drop: np.ndarray, cap_dup: np.ndarray, probs: list[np.ndarray],
                         unmatched_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """``(p (S,), reason (S,) index into DROP_REASONS)``: the max over a sample's live captions of
    their best entry probability; ``drop`` (S,) holds the dedup reasons decided globally (0 =
    none), ``cap_dup`` (C,) the duplicate captions."""
    S = len(index["keys"])
    cap_off, m_off, ids, lang = index["cap_offsets"], index["match_offsets"], index["match_ids"], index["cap_lang"]
    cap_sample = np.repeat(np.arange(S), np.diff(cap_off))  # (C,)
    n_match = np.diff(m_off)
    entry_p = np.zeros(len(ids))
    match_lang = np.repeat(lang, n_match)
    for li, p in enumerate(probs):
        sel = match_lang == li
        entry_p[sel] = p[ids[sel]]
    cap_p = np.full(len(lang), unmatched_prob)  # a caption without matches: the unmatched probability
    has = n_match > 0
    cap_p[has] = np.maximum.reduceat(entry_p, m_off[:-1][has]) if len(ids) else 0.0
    cap_p[cap_dup] = -1.0  # a duplicate caption counts for nothing
    sample_p = np.full(S, -1.0)
    np.maximum.at(sample_p, cap_sample, cap_p)
    matched = np.zeros(S, dtype=bool)
    np.logical_or.at(matched, cap_sample, has & ~cap_dup)
    reason = np.zeros(S, dtype=np.int64)
    alive = np.zeros(S, dtype=bool)
    np.logical_or.at(alive, cap_sample, ~cap_dup)
    n_caps = np.diff(cap_off)
    reason[(~alive) & (n_caps > 0)] = DROP_REASONS.index("duplicate_caption")
    reason[(n_caps > 0) & alive & ~matched & (unmatched_prob <= 0)] = DROP_REASONS.index("no_metadata_match")
    reason[n_caps == 0] = DROP_REASONS.index("no_caption")
    reason[index["img_hash"] == 0] = DROP_REASONS.index("no_image")
    reason[drop > 0] = drop[drop > 0]
    p = np.where(reason == 0, np.clip(sample_p, 0.0, 1.0), 0.0)
    return p, reason


def apply_unit(unit: Unit, settings: ApplySettings, drop: np.ndarray, cap_dup: np.ndarray) -> dict:
    """Pass 2 over one unit (module docstring). Returns ``{"unit", "reasons" (counts per reason),
    "expected": {lang: expected kept captions}, "after": {lang: (E,) expected matches after},
    "written": samples written, "p_sum": expected kept samples}``."""
    from mae.common.files import atomic_open

    langs = settings.scan.languages
    index = load_index(settings.scan.work, unit)
    probs = [settings.probs[lang] for lang in langs]
    p, reason = sample_probabilities(index, drop, cap_dup, probs, settings.unmatched_prob)
    path = os.path.join(settings.staging, "keep", f"{unit.name}.keep.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = {"format": FORMAT, "unit": unit.name, "keys": index["keys"].tolist(), "p": np.round(p, 6).tolist()}
    with atomic_open(path, "w") as f:
        json.dump(body, f, ensure_ascii=False, separators=(",", ":"))
    cap_off, m_off, ids, lang = index["cap_offsets"], index["match_offsets"], index["match_ids"], index["cap_lang"]
    cap_p = np.repeat(p, np.diff(cap_off)) * ~cap_dup  # (C,) each live caption kept with its sample
    expected = {l: float(cap_p[lang == i].sum()) for i, l in enumerate(langs)}
    match_p, match_lang = np.repeat(cap_p, np.diff(m_off)), np.repeat(lang, np.diff(m_off))
    after = {l: np.bincount(ids[match_lang == i], weights=match_p[match_lang == i], minlength=len(probs[i]))
             for i, l in enumerate(langs)}
    written = _write_shard(unit, settings, index, p, cap_dup) if settings.shard_staging else 0
    return {"unit": unit.index, "reasons": np.bincount(reason, minlength=len(DROP_REASONS)), "expected": expected,
            "after": after, "written": written, "p_sum": float(p.sum())}


def _write_shard(unit: Unit, settings: ApplySettings, index: dict, p: np.ndarray, cap_dup: np.ndarray) -> int:
    """The samples drawn kept (epoch 0), with their checked captions, as ``shards/{unit:06d}.tar``."""
    from webdataset import TarWriter

    from mae.common.files import atomic_open

    lid, _ = worker_state(settings.scan)
    langs = settings.scan.languages
    filed = tuple(dict.fromkeys([*langs, *lid.candidates]))
    keys, cap_off = index["keys"], index["cap_offsets"]
    written = 0
    path = os.path.join(settings.shard_staging, f"{unit.index:06d}.tar")
    with atomic_open(path, "wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0)
        for i, s in enumerate(read_unit(unit, filed)):
            if str(s["key"]) != keys[i]:
                raise ValueError(f"{unit.url or unit.name} changed since it was scanned (sample {i})")
            if not keep_draw(float(p[i]), settings.seed, 0, keys[i]):
                continue
            caps: dict[str, list[str]] = {}
            for j, (li, text) in enumerate(sample_captions(s, lid, settings.scan, {})):
                if not cap_dup[cap_off[i] + j]:
                    caps.setdefault(langs[li], []).append(text)
            meta = {k: v for k, v in s["meta"].items() if k not in ("captions", "caption_sources", *filed)}
            meta["captions"] = caps
            if isinstance(s["meta"].get("caption_sources"), dict):  # relabelled captions keep their source
                meta["caption_sources"] = caption_sources(s["meta"], caps)
            sample = {"__key__": keys[i], image_ext(s["image"]): s["image"],
                      "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
            if langs[0] in caps:
                sample["txt"] = caps[langs[0]][0].encode("utf-8")
            writer.write(sample)
            written += 1
        writer.close()
    return written
