"""Curate a raw bilingual crawl into a balanced training set, MetaCLIP 2 style (the library:
:mod:`clip.data.curation`)::

    python -m clip.curate SOURCE --out OUT --metadata en=titles_en.txt ko=titles_ko.txt --t en=170000
    python -m clip.curate SOURCE --out OUT --build-metadata en=data/corpus/en.txt ko=data/corpus/ko.txt \\
        --target-size 100000 [--target-share ko=0.4] [--write-shards SHARDS] [--workers 8]

SOURCE is anything the trainers read (a ``.jsonl`` / ``.csv`` manifest, a folder of ``.tar`` shards,
a brace pattern, ``pipe:`` URLs). OUT receives ``keep/`` (the per-sample keep probabilities the
loaders apply online, config ``data.curation: OUT``), ``report.md``, ``report.png``,
``curation.json`` and ``counts.npz``. Bad input is one line on stderr and exit code 2, with
nothing half-written left behind.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _pairs(values: Sequence[str] | None, what: str, cast=str) -> dict:
    out = {}
    for v in values or ():
        lang, sep, val = v.partition("=")
        if not sep or not lang or not val:
            raise ValueError(f"{what}: expected LANG=VALUE, got {v!r}")
        try:
            out[lang] = cast(val)
        except ValueError:
            raise ValueError(f"{what}: {val!r} is not a number") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clip.curate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="manifest, shard folder, brace pattern or pipe: URLs (as the trainers read)")
    p.add_argument("--out", required=True, help="curation folder (keep/, report.md, report.png, curation.json)")
    p.add_argument("--languages", nargs="+", default=["en", "ko"], help="languages to curate (default: en ko)")
    p.add_argument("--metadata", nargs="+", metavar="LANG=FILE", help="entry list per language, one per line")
    p.add_argument("--build-metadata", nargs="+", metavar="LANG=CORPUS",
                   help="build the entries from a text corpus: frequent words and PMI-ranked bigrams")
    p.add_argument("--min-count", type=int, default=3, help="--build-metadata: least occurrences of an entry")
    p.add_argument("--lid-languages", nargs="+", default=[], metavar="LANG",
                   help="language ID candidates besides --languages (default: ja zh)")
    p.add_argument("--mislabelled", choices=["relabel", "drop"], default="relabel",
                   help="captions identified as another language (or mixed): move them, or drop them")
    p.add_argument("--t", nargs="+", metavar="LANG=CAP", help="caps per language (en=170000); others follow "
                   "the tail-share rule")
    p.add_argument("--target-size", type=float, help="search t_en so that this many captions are kept (expected)")
    p.add_argument("--target-share", nargs="+", metavar="LANG=SHARE", help="a language's share of the kept captions")
    p.add_argument("--unmatched", type=float, default=0.0, help="keep probability of captions matching no entry")
    p.add_argument("--no-dedup", action="store_true", help="keep duplicate images and captions")
    p.add_argument("--near-dup-threshold", type=int, default=None,
                   help="perceptual-hash Hamming distance for near duplicates (-1: exact copies only)")
    p.add_argument("--write-shards", metavar="DIR", help="also write the kept samples (one draw) as new shards")
    p.add_argument("--overwrite", action="store_true", help="replace .tar shards already in --write-shards")
    p.add_argument("--seed", type=int, default=0, help="seed of the --write-shards draw")
    p.add_argument("--workers", type=int, default=1, help="processes (or Ray tasks in flight)")
    p.add_argument("--engine", choices=["multiprocessing", "ray"], default="multiprocessing",
                   help="ray: tasks on the cluster of RAY_ADDRESS (pip install 'enko-clip[ray]')")
    args = p.parse_args(argv)
    try:
        from clip.data.curation import dedup
        from clip.data.curation.pipeline import CurateConfig, curate

        if args.write_shards and not args.overwrite and os.path.isdir(args.write_shards) and \
                any(n.endswith(".tar") for n in os.listdir(args.write_shards)):
            raise ValueError(f"{args.write_shards} already holds .tar shards (use --overwrite)")
        cfg = CurateConfig(
            source=args.source, out=args.out, languages=tuple(args.languages),
            metadata=_pairs(args.metadata, "--metadata"),
            build_metadata=_pairs(args.build_metadata, "--build-metadata"),
            min_count=args.min_count, lid_languages=tuple(args.lid_languages), mislabelled=args.mislabelled,
            caps=_pairs(args.t, "--t", float), target_size=args.target_size,
            target_share=_pairs(args.target_share, "--target-share", float), unmatched_prob=args.unmatched,
            dedup=not args.no_dedup, write_shards=args.write_shards, seed=args.seed, workers=args.workers,
            engine=args.engine,
            near_dup_threshold=dedup.PHASH_THRESHOLD if args.near_dup_threshold is None else args.near_dup_threshold)
        summary = curate(cfg, log=lambda line: print(f"clip.curate: {line}", flush=True))
    except (ValueError, OSError) as e:
        print(f"clip.curate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    caps = ", ".join(f"t_{lang} = {t:,.0f}" for lang, t in summary["caps"].items())
    written = f"; {summary['written']:,} written to {args.write_shards}" if summary["written"] is not None else ""
    print(f"clip.curate: {summary['samples']:,} samples, {summary['samples_expected_after']:,.0f} kept per epoch "
          f"(expected){written}; {caps} -> {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
