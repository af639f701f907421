"""``curate(config)``: the whole curation of one source, from the metadata to the report.

Steps: metadata (read or built) -> pass 1 over every unit in parallel (:mod:`.scan`: language ID,
matching, hashing; counts merged) -> deduplication over all units (:mod:`.dedup`), counts less
what it removed -> caps (:mod:`.balance`) -> pass 2 in parallel (:mod:`.apply`: keep files, new
shards) -> report (:mod:`.report`). Units run in worker processes (``multiprocessing``) or as Ray
tasks (``engine="ray"``, for a cluster whose nodes all see the source and the output folder).

Everything is written under a staging folder inside ``out`` (and inside the shard folder) and
moved into place at the end, so a failure leaves the previous outputs, never half of new ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clip.data.curation import balance, dedup
from clip.data.curation.apply import DROP_REASONS, ApplySettings, apply_unit
from clip.data.curation.dedup import PHASH_THRESHOLD
from clip.data.curation.engines import ENGINES, run_units
from clip.data.curation.langid import LanguageIdentifier, known_languages
from clip.data.curation.metadata import build_metadata, read_entries, read_text
from clip.data.curation.scan import ScanSettings, Unit, load_index, make_units, scan_unit


@dataclass(frozen=True)
class CurateConfig:
    """One curation (``python -m clip.curate --help`` says what each setting means)."""

    source: str
    out: str
    languages: tuple[str, ...] = ("en", "ko")
    metadata: Mapping[str, str] = field(default_factory=dict)  # lang -> entries file
    build_metadata: Mapping[str, str] = field(default_factory=dict)  # lang -> corpus file
    min_count: int = 3
    lid_languages: tuple[str, ...] = ()
    mislabelled: str = "relabel"
    caps: Mapping[str, float] = field(default_factory=dict)
    target_size: float | None = None
    target_share: Mapping[str, float] = field(default_factory=dict)
    unmatched_prob: float = 0.0
    dedup: bool = True
    near_dup_threshold: int = PHASH_THRESHOLD  # -1: exact duplicates only (no image decoding)
    write_shards: str | None = None
    seed: int = 0
    workers: int = 1
    engine: str = "multiprocessing"

    @property
    def reference(self) -> str:
        return "en" if "en" in self.languages else self.languages[0]


def check_config(cfg: CurateConfig) -> None:
    """ValueError (one line) for settings that cannot work, before anything is read or written."""
    known = set(known_languages())
    for where, codes in (("--languages", cfg.languages), ("--metadata", cfg.metadata), ("--build-metadata",
                         cfg.build_metadata), ("--t", cfg.caps), ("--target-share", cfg.target_share),
                         ("--lid-languages", cfg.lid_languages)):
        bad = [c for c in codes if c not in known]
        if bad:
            raise ValueError(f"{where}: unknown language code {bad[0]!r} (known: ISO 639-1 codes such as en ko ja zh)")
        extra = [c for c in codes if c not in cfg.languages and where not in ("--languages", "--lid-languages")]
        if extra:
            raise ValueError(f"{where}: {extra[0]!r} is not one of --languages {' '.join(cfg.languages)}")
    missing = [l for l in cfg.languages if l not in cfg.metadata and l not in cfg.build_metadata]
    if missing:
        raise ValueError(f"no metadata for {missing[0]!r}: give --metadata {missing[0]}=FILE or --build-metadata "
                         f"{missing[0]}=CORPUS")
    if cfg.reference not in cfg.caps and cfg.target_size is None:
        raise ValueError(f"give --t {cfg.reference}=CAP or --target-size N")
    if cfg.mislabelled not in ("relabel", "drop"):
        raise ValueError(f"--mislabelled must be relabel or drop, got {cfg.mislabelled!r}")
    if cfg.engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    if cfg.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--engine ray needs Ray: pip install 'enko-clip[ray]'") from None
    if not 0 <= cfg.unmatched_prob <= 1:
        raise ValueError(f"--unmatched must be in [0, 1], got {cfg.unmatched_prob}")


def load_metadata(cfg: CurateConfig) -> dict[str, list[str]]:
    """Entries per language: read from ``metadata`` files or built from ``build_metadata`` corpora."""
    out = {}
    for lang in cfg.languages:
        if lang in cfg.metadata:
            out[lang] = read_entries(cfg.metadata[lang])
        else:
            lines = read_text(cfg.build_metadata[lang], "corpus").splitlines()
            out[lang] = build_metadata(lines, lang, cfg.min_count)
            if not out[lang]:
                raise ValueError(f"{cfg.build_metadata[lang]}: no word occurs {cfg.min_count} times; no metadata built")
    return out


# ----------------------------------------------------------------------------- the curation
def merge_counts(results: list[dict], languages) -> dict[str, np.ndarray]:
    """Per-language counts summed over the units' pass-1 results."""
    return {lang: np.sum([r["counts"][lang] for r in results], axis=0) for lang in languages}


def _dedup(units: list[Unit], work: str, cfg: CurateConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per unit: a drop code per sample (index into DROP_REASONS; 0 = none) and a duplicate flag per caption."""
    idx = [load_index(work, u, ("img_hash", "phash", "colour", "has_phash", "cap_hash", "cap_offsets")) for u in units]
    sizes = [len(i["img_hash"]) for i in idx]
    cat = {k: np.concatenate([i[k] for i in idx]) for k in ("img_hash", "phash", "colour", "has_phash", "cap_hash")}
    drop = np.zeros(sum(sizes), dtype=np.int64)
    cap_dup = np.zeros(len(cat["cap_hash"]), dtype=bool)
    if cfg.dedup:
        near = cfg.near_dup_threshold >= 0
        exact, near_dup = dedup.duplicate_images(cat["img_hash"], cat["phash"] if near else None, cat["colour"],
                                                 cat["has_phash"], cfg.near_dup_threshold)
        drop[near_dup] = DROP_REASONS.index("near_duplicate")
        drop[exact] = DROP_REASONS.index("exact_duplicate")
        cap_sample = np.repeat(np.arange(len(drop)), np.concatenate([np.diff(i["cap_offsets"]) for i in idx]))
        cap_dup = dedup.duplicate_captions(cat["cap_hash"], drop[cap_sample] == 0)
    split = np.cumsum(sizes)[:-1]
    cap_split = np.cumsum([len(i["cap_hash"]) for i in idx])[:-1]
    return np.split(drop, split), np.split(cap_dup, cap_split)


def _live_counts(units, work, languages, counts, drops, cap_dups):
    """Counts less the captions that deduplication removed, then per language the (m, n) minima of
    :func:`balance.expected_kept` and the captions without any match."""
    live = {l: c.copy() for l, c in counts.items()}
    for u, drop, cap_dup in zip(units, drops, cap_dups):
        i = load_index(work, u)
        dead = cap_dup | (np.repeat(drop, np.diff(i["cap_offsets"])) > 0)
        n = np.diff(i["match_offsets"])
        m_dead, m_lang = np.repeat(dead, n), np.repeat(i["cap_lang"], n)
        for li, lang in enumerate(languages):
            live[lang] -= np.bincount(i["match_ids"][m_dead & (m_lang == li)], minlength=len(live[lang]))
    minima = {l: [] for l in languages}
    unmatched = dict.fromkeys(languages, 0)
    for u, drop, cap_dup in zip(units, drops, cap_dups):
        i = load_index(work, u)
        alive = ~cap_dup & (np.repeat(drop, np.diff(i["cap_offsets"])) == 0)
        n, off, ids = np.diff(i["match_offsets"]), i["match_offsets"], i["match_ids"]
        m_lang = np.repeat(i["cap_lang"], n)
        for li, lang in enumerate(languages):
            c = np.zeros(len(ids), dtype=np.int64)
            c[m_lang == li] = live[lang][ids[m_lang == li]]
            sel = alive & (n > 0) & (i["cap_lang"] == li)
            if len(ids):
                minima[lang].append(np.minimum.reduceat(c, off[:-1][n > 0])[sel[n > 0]])
            unmatched[lang] += int((alive & (n == 0) & (i["cap_lang"] == li)).sum())
    out = {}
    for lang in languages:
        m = np.concatenate(minima[lang]) if minima[lang] else np.zeros(0, dtype=np.int64)
        out[lang] = np.unique(m, return_counts=True)
    return live, out, unmatched


def _staging(folder: str, created: list[str]) -> str:
    """A staging folder inside ``folder`` (created, and noted in ``created``, if missing)."""
    from mae.common.files import WriteError

    try:
        if not os.path.isdir(folder):
            os.makedirs(folder)
            created.append(folder)
        return tempfile.mkdtemp(prefix=".curate-", dir=folder)
    except OSError as e:
        raise WriteError(e.errno, f"cannot write to {folder}: {e.strerror or e}") from None


def _move_into_place(staging: str, folder: str, names: list[str]) -> None:
    for name in names:
        src, dst = os.path.join(staging, name), os.path.join(folder, name)
        if not os.path.exists(src):
            continue
        if os.path.isdir(dst) and os.path.isdir(src):
            shutil.rmtree(dst)
        os.replace(src, dst)


def curate(cfg: CurateConfig, log: Callable[[str], None] = lambda line: None) -> dict:
    """Curate ``cfg.source`` into ``cfg.out`` (module docstring); returns the summary written to
    ``OUT/curation.json``. Bad input is a ValueError / FileNotFoundError / WriteError (one line)
    with nothing left behind."""
    from mae.images.sources import resolve_source
    from clip.data.curation.report import write_report

    check_config(cfg)
    entries = load_metadata(cfg)
    kind, items = resolve_source(cfg.source)
    if kind == "records" and not any("row" in r for r in items):
        raise ValueError(f"{cfg.source}: a plain image folder has no captions to curate")
    units = make_units(kind, items)
    names = [u.name for u in units]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two shards are named {twice!r} (keep files are named by folder/shard); curate them apart")
    if cfg.write_shards and any(os.path.abspath(os.path.dirname(u.url)) == os.path.abspath(cfg.write_shards)
                                for u in units if u.url):
        raise ValueError(f"--write-shards {cfg.write_shards} is the source's folder; write the new shards elsewhere")
    created: list[str] = []
    staging = shard_staging = None
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name):  # seconds since the previous lap
        timings[name], clock[0] = time.perf_counter() - clock[0], time.perf_counter()

    try:
        staging = _staging(cfg.out, created)
        shard_staging = _staging(cfg.write_shards, created) if cfg.write_shards else None
        work = os.path.join(staging, "work")
        os.makedirs(work)
        candidates = LanguageIdentifier(cfg.languages, cfg.lid_languages, cfg.mislabelled).candidates
        fingerprint = hashlib.sha1(json.dumps([cfg.languages, candidates, cfg.mislabelled, entries],
                                              ensure_ascii=False).encode()).hexdigest()
        scan = ScanSettings(cfg.languages, candidates, cfg.mislabelled, entries, work,
                            cfg.dedup and cfg.near_dup_threshold >= 0, fingerprint)
        log(f"pass 1 (language ID, matching, hashing): {len(units)} units, {cfg.workers} workers ({cfg.engine})")
        results = run_units(scan_unit, [(u,) for u in units], scan, cfg.engine, cfg.workers)
        lap("pass1")
        stats: dict[str, int] = {}
        for r in results:
            for k, v in r["stats"].items():
                stats[k] = stats.get(k, 0) + v
        if stats.get("captions_filed", 0) == 0:
            raise ValueError(f"{cfg.source}: no captions in {' '.join(candidates)} "
                             "(json 'captions', language fields or .txt)")
        counts = merge_counts(results, cfg.languages)
        drops, cap_dups = _dedup(units, work, cfg)
        live, minima, unmatched = _live_counts(units, work, cfg.languages, counts, drops, cap_dups)
        lap("dedup")
        caps = balance.solve_caps(live, minima, cfg.reference, cfg.caps, cfg.target_size, cfg.target_share,
                                  unmatched, cfg.unmatched_prob)
        probs = {lang: balance.entry_probabilities(live[lang], caps[lang]) for lang in cfg.languages}
        log("caps: " + ", ".join(f"t_{lang} = {t:,.0f}" for lang, t in caps.items()) + "; pass 2 (keep probabilities)")
        settings = ApplySettings(scan, probs, cfg.unmatched_prob, staging, shard_staging, cfg.seed)
        applied = run_units(apply_unit, list(zip(units, drops, cap_dups)), settings, cfg.engine, cfg.workers)
        lap("pass2")
        after = {lang: np.sum([a["after"][lang] for a in applied], axis=0) for lang in cfg.languages}
        reasons = np.sum([a["reasons"] for a in applied], axis=0)
        summary = {
            "source": cfg.source, "languages": list(cfg.languages), "reference": cfg.reference,
            "caps": caps, "tail_share": balance.tail_share(live[cfg.reference], caps[cfg.reference]),
            "entries": {lang: len(entries[lang]) for lang in cfg.languages},
            "stats": stats, "samples": int(reasons.sum()),
            "dropped": {r: int(n) for r, n in zip(DROP_REASONS, reasons) if r != "kept"},
            "captions_before": {lang: stats.get(f"captions_{lang}", 0) for lang in cfg.languages},
            "captions_expected_after": {lang: sum(a["expected"][lang] for a in applied) for lang in cfg.languages},
            "samples_expected_after": sum(a["p_sum"] for a in applied),
            "written": sum(a["written"] for a in applied) if cfg.write_shards else None, "seconds": timings,
            "config": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(cfg).items()},
        }
        write_report(staging, summary, entries, counts, live, after)
        if cfg.build_metadata:
            from mae.common.files import atomic_write_text

            os.makedirs(os.path.join(staging, "metadata"))
            for lang in cfg.build_metadata:
                atomic_write_text(os.path.join(staging, "metadata", f"{lang}.txt"), "\n".join(entries[lang]) + "\n")
        shutil.rmtree(work)
        if shard_staging is not None:
            _finish_shards(shard_staging, cfg, applied, units)
        _move_into_place(staging, cfg.out, ["keep", "metadata", "report.md", "report.png", "counts.npz",
                                            "curation.json"])
    except BaseException:
        for folder in created:  # made for this run: nothing of it stays
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        for folder in (staging, shard_staging):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    return summary


def _finish_shards(staging: str, cfg: CurateConfig, applied: list[dict], units: list[Unit]) -> None:
    """Move the written shards into ``cfg.write_shards`` (empty ones dropped) and write its stats.json."""
    from mae.common.files import atomic_write_text
    from mae.images.shards import STATS_FILE, prepare_shard_folder

    names, sizes = [], []
    for a, u in zip(applied, units):
        if a["written"]:
            names.append(f"{u.index:06d}.tar")
            sizes.append(a["written"])
    prepare_shard_folder(Path(cfg.write_shards), overwrite=True)
    for n in names:
        os.replace(os.path.join(staging, n), os.path.join(cfg.write_shards, n))
    stats = {"source": cfg.source, "curation": os.path.abspath(cfg.out), "samples": sum(sizes),
             "shards": names, "shard_samples": sizes, "seed": cfg.seed}
    atomic_write_text(os.path.join(cfg.write_shards, STATS_FILE), json.dumps(stats, indent=1, ensure_ascii=False))
