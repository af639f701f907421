# Over 300 lines: one tool read in order (sampling the corpus, training, the report, the command line).
"""Train the bilingual English + Korean byte-level BPE, following KELIP.

KELIP (Ko et al. 2022) trained one BPE with a 98K vocabulary (98,304 tokens) on 2M English and
1.5M Korean sentences. This module does the same with HF ``tokenizers`` (Rust) on any set of
line-per-sentence files and writes ``tokenizer.json`` + ``tokenizer_meta.json``.

Sampling. Each corpus file is one language stream. Per file: non-UTF-8 lines are skipped and
counted (a file where they are more than half of the non-blank lines is refused as not text),
blank lines are skipped, at most ``max_lines_per_file`` lines are kept (a seeded uniform
sample of the file), and these are shuffled. The first ``min(heldout_lines, n // 10)`` of them are
held out: never trained on, they give the report's fertility figures. From what is left, the file
with ratio r contributes ``floor(r * k)`` lines, with k as large as the scarcest file allows
(``k = min(available_i / r_i)``), so the line ratio between languages is exactly the configured
one and the limiting file is used whole. The default ratios are KELIP's 2 : 1.5 English : Korean
when every file is English or Korean, equal ratios otherwise. A file's language comes from
``languages`` or is guessed from its name ("en.txt", "corpus_ko.txt"); it only labels the report
and picks the default ratio.

The report (returned, printed by the CLI and stored in ``tokenizer_meta.json``) gives the training
time, the vocabulary size, the share of the vocabulary containing Hangul, and, per language on the
held-out lines: tokens, characters and UTF-8 bytes per line, tokens per character, the share of
lines cut at the 77-token context, and exact round-trip failures (must be 0).

Usage: ``python -m tokenizer.train --corpus en.txt ko.txt [--vocab-size 98304] [--out DIR]``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import pre_tokenizers, trainers

from tokenizer.bpe import (
    CONTEXT_LENGTH,
    EOT_TOKEN,
    META_FORMAT,
    NORMALIZATIONS,
    PAD_TOKEN,
    SOT_TOKEN,
    SPECIAL_TOKENS,
    BilingualTokenizer,
    add_post_processor,
    build_untrained_tokenizer,
)

KELIP_VOCAB_SIZE = 98304
KELIP_RATIOS = {"en": 2.0, "ko": 1.5}  # lines of English : lines of Korean
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
DEFAULT_OUT = "runs/tokenizer"
DEFAULT_HELDOUT_LINES = 2000
MAX_UNDECODABLE_SHARE = 0.5  # a corpus file with more non-UTF-8 lines than this is refused
_LANGUAGE_NAMES = {"en": "en", "eng": "en", "english": "en", "ko": "ko", "kor": "ko", "korean": "ko", "kr": "ko"}
_HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff]")


@dataclass
class CorpusStream:
    """One corpus file after sampling: its training lines and held-out lines."""

    path: str
    language: str
    ratio: float
    lines_seen: int = 0  # usable (UTF-8, non-blank) lines in the file
    non_utf8_skipped: int = 0
    blank_skipped: int = 0
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)


def guess_language(path: str) -> str:
    """Language code from a file name: "en.txt" -> "en", "wiki_korean.txt" -> "ko", else the stem."""
    stem = Path(path).name.split(".")[0].lower()
    for part in [stem, *re.split(r"[^a-z]+", stem)]:
        if part in _LANGUAGE_NAMES:
            return _LANGUAGE_NAMES[part]
    return stem


def _read_lines(path: str, max_lines: int | None, rng: random.Random) -> tuple[list[str], int, int, int]:
    """Usable lines of ``path`` (a uniform sample of ``max_lines`` if set) and the skip counts."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if p.stat().st_size == 0:
        raise ValueError(f"corpus file is empty: {path}")
    kept: list[str] = []
    seen = bad = blank = 0
    with open(p, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                bad += 1
                continue
            if not line.strip():
                blank += 1
                continue
            seen += 1
            if max_lines is None or len(kept) < max_lines:
                kept.append(line)
            else:  # reservoir sampling: every line has the same chance max_lines / seen
                j = rng.randrange(seen)
                if j < max_lines:
                    kept[j] = line
    if not kept:
        raise ValueError(f"corpus file has no usable lines ({bad} non-UTF-8, {blank} blank): {path}")
    if bad > MAX_UNDECODABLE_SHARE * (bad + seen):
        raise ValueError(f"corpus file is mostly not UTF-8 text ({bad} of {bad + seen} non-blank lines undecodable): "
                         f"{path}")
    return kept, seen, bad, blank


def sample_corpus(
    corpus_files: list[str],
    languages: list[str] | None = None,
    ratios: list[float] | None = None,
    max_lines_per_file: int | None = None,
    heldout_lines: int = DEFAULT_HELDOUT_LINES,
    seed: int = 0,
) -> list[CorpusStream]:
    """Read, sample and balance the corpus files as described in the module docstring."""
    if not corpus_files:
        raise ValueError("no corpus files given")
    n = len(corpus_files)
    if languages is not None and len(languages) != n:
        raise ValueError(f"--languages has {len(languages)} entries for {n} corpus files")
    if ratios is not None and len(ratios) != n:
        raise ValueError(f"--ratios has {len(ratios)} entries for {n} corpus files")
    if ratios is not None and not all(r > 0 and math.isfinite(r) for r in ratios):
        raise ValueError(f"ratios must be positive, got {ratios}")
    if max_lines_per_file is not None and max_lines_per_file < 1:
        raise ValueError(f"max_lines_per_file must be >= 1, got {max_lines_per_file}")
    if heldout_lines < 0:
        raise ValueError(f"heldout_lines must be >= 0, got {heldout_lines}")
    langs = list(languages) if languages is not None else [guess_language(p) for p in corpus_files]
    if ratios is None:
        known = all(lang in KELIP_RATIOS for lang in langs)
        ratios = [KELIP_RATIOS[lang] if known else 1.0 for lang in langs]

    streams = []
    for i, (path, lang, ratio) in enumerate(zip(corpus_files, langs, ratios)):
        rng = random.Random(f"{seed}:{i}")  # per file, so adding a file leaves the others alone
        lines, seen, bad, blank = _read_lines(path, max_lines_per_file, rng)
        rng.shuffle(lines)
        n_held = min(heldout_lines, len(lines) // 10)
        streams.append(CorpusStream(str(path), lang, float(ratio), seen, bad, blank,
                                    train=lines[n_held:], heldout=lines[:n_held]))
    k = min(len(s.train) / s.ratio for s in streams)
    for s in streams:
        s.train = s.train[: min(len(s.train), int(math.floor(s.ratio * k + 1e-9)))]
    return streams


def _heldout_stats(tok: BilingualTokenizer, lines: list[str], context_length: int) -> dict | None:
    if not lines:
        return None
    norm = [tok.normalize(x) for x in lines]
    ids = tok.encode_texts(lines)
    n_tok = sum(map(len, ids))
    n_chr = sum(map(len, norm))
    n_byte = sum(len(x.encode("utf-8")) for x in norm)
    decoded = tok.hf_tokenizer.decode_batch(ids, skip_special_tokens=True)
    return {
        "lines": len(lines),
        "tokens_per_line": n_tok / len(lines),
        "chars_per_line": n_chr / len(lines),
        "bytes_per_line": n_byte / len(lines),
        "tokens_per_char": n_tok / max(n_chr, 1),
        "bytes_per_token": n_byte / max(n_tok, 1),
        "truncated_share": sum(len(x) + 2 > context_length for x in ids) / len(lines),
        "roundtrip_failures": sum(d != x for d, x in zip(decoded, norm)),
    }


def _hangul_vocab(tok: BilingualTokenizer) -> int:
    """How many vocabulary entries decode to text holding at least one Hangul character."""
    dec = tok.hf_tokenizer.decoder
    return sum(bool(_HANGUL.search(dec.decode([t]))) for t in tok.hf_tokenizer.get_vocab())


def train_tokenizer(
    corpus_files: list[str],
    out_dir: str,
    vocab_size: int = KELIP_VOCAB_SIZE,
    max_lines_per_file: int | None = None,
    lowercase: bool = True,
    ratios: list[float] | None = None,
    heldout_lines: int = DEFAULT_HELDOUT_LINES,
    seed: int = 0,
    languages: list[str] | None = None,
    normalization: str = "nfc",
    min_frequency: int = 2,
    context_length: int = CONTEXT_LENGTH,
) -> dict:
    """Train the BPE on ``corpus_files`` and write it to ``out_dir``; return the report.

    Args:
        corpus_files: one line-per-sentence UTF-8 file per language stream.
        out_dir: folder for ``tokenizer.json`` and ``tokenizer_meta.json`` (created).
        vocab_size: target vocabulary size including the 3 special tokens (KELIP: 98,304).
        max_lines_per_file: keep at most this many lines of each file (uniform sample); None = all.
        lowercase: lowercase in the normaliser (KELIP and CLIP do).
        ratios: lines per file in proportion (default 2 : 1.5 for English : Korean).
        heldout_lines: lines per file held out of training for the report (at most 10% of a file).
        seed: sampling seed.
        languages: language label per file (default: guessed from the file names).
        normalization: "nfc" (default, keeps Hangul composed) or "nfkc".
        min_frequency: a merge needs at least this many occurrences.
        context_length: stored in the meta and used for the truncation figures.
    """
    t0 = time.perf_counter()
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is below the byte-level minimum {MIN_VOCAB_SIZE} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    streams = sample_corpus(corpus_files, languages, ratios, max_lines_per_file, heldout_lines, seed)

    hf = build_untrained_tokenizer(normalization, lowercase)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train_lines = [line for s in streams for line in s.train]
    t1 = time.perf_counter()
    hf.train_from_iterator(
        (train_lines[i: i + 10_000] for i in range(0, len(train_lines), 10_000)), trainer, length=len(train_lines)
    )
    train_seconds = time.perf_counter() - t1
    add_post_processor(hf)
    ids = {name: hf.token_to_id(t) for name, t in (("pad", PAD_TOKEN), ("sot", SOT_TOKEN), ("eot", EOT_TOKEN))}
    if ids != {"pad": 0, "sot": 1, "eot": 2}:
        raise RuntimeError(f"unexpected special-token ids {ids}")  # a tokenizers behaviour change

    meta = {
        "format": META_FORMAT,
        "model": "byte-level BPE (KELIP-style bilingual en+ko)",
        "vocab_size": hf.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": vocab_size,
        "context_length": context_length,
        "special_tokens": {name: {"token": t, "id": ids[name]}
                           for name, t in (("pad", PAD_TOKEN), ("sot", SOT_TOKEN), ("eot", EOT_TOKEN))},
        "normalization": {"unicode": normalization, "lowercase": lowercase, "whitespace": "collapse+strip"},
        "training": {"min_frequency": min_frequency, "max_lines_per_file": max_lines_per_file,
                     "heldout_lines": heldout_lines, "seed": seed},
    }
    tok = BilingualTokenizer(hf, meta)

    n_train = len(train_lines)
    languages_report = {}
    for s in streams:
        key = s.language if s.language not in languages_report else f"{s.language}#{len(languages_report)}"
        languages_report[key] = {
            "file": s.path,
            "ratio": s.ratio,
            "lines_seen": s.lines_seen,
            "non_utf8_skipped": s.non_utf8_skipped,
            "blank_skipped": s.blank_skipped,
            "train_lines": len(s.train),
            "train_share": len(s.train) / n_train,
            "heldout": _heldout_stats(tok, s.heldout, context_length),
        }
    n_hangul = _hangul_vocab(tok)
    report = {
        "vocab_size": meta["vocab_size"],
        "requested_vocab_size": vocab_size,
        "train_lines": n_train,
        "train_seconds": train_seconds,
        "hangul_vocab_tokens": n_hangul,
        "hangul_vocab_share": n_hangul / meta["vocab_size"],
        "non_utf8_skipped": sum(s.non_utf8_skipped for s in streams),
        "languages": languages_report,
    }
    meta["corpus"] = [{"file": s.path, "language": s.language, "ratio": s.ratio} for s in streams]
    meta["report"] = report
    tok.save(out_dir)
    report["total_seconds"] = time.perf_counter() - t0
    report["out_dir"] = str(out_dir)
    return report


def format_report(report: dict) -> str:
    """The report as a few human-readable lines."""
    lines = [
        f"trained in {report['train_seconds']:.1f} s ({report['total_seconds']:.1f} s total) "
        f"on {report['train_lines']:,} lines -> {report['out_dir']}",
        f"vocab size {report['vocab_size']:,} (requested {report['requested_vocab_size']:,}); "
        f"{report['hangul_vocab_tokens']:,} tokens contain Hangul ({report['hangul_vocab_share']:.1%})",
    ]
    if report["vocab_size"] < report["requested_vocab_size"]:
        lines.append("WARNING: the corpus supported fewer merges than requested; vocab is smaller")
    lines.append(f"non-UTF-8 lines skipped: {report['non_utf8_skipped']}")
    lines.append(f"{'lang':6} {'ratio':>5} {'train':>9} {'share':>6} {'heldout':>7} {'tok/line':>8} "
                 f"{'chr/line':>8} {'B/line':>7} {'tok/chr':>7} {'trunc77':>7} {'rt-fail':>7} {'bad-utf8':>8}")
    for lang, r in report["languages"].items():
        h = r["heldout"]
        held = (f"{h['lines']:7d} {h['tokens_per_line']:8.2f} {h['chars_per_line']:8.2f} {h['bytes_per_line']:7.2f} "
                f"{h['tokens_per_char']:7.3f} {h['truncated_share']:7.2%} {h['roundtrip_failures']:7d}"
                if h else f"{0:7d} {'-':>8} {'-':>8} {'-':>7} {'-':>7} {'-':>7} {'-':>7}")
        lines.append(f"{lang:6} {r['ratio']:5.2f} {r['train_lines']:9,d} {r['train_share']:6.1%} {held} "
                     f"{r['non_utf8_skipped']:8d}")
    if any(r["heldout"] and r["heldout"]["roundtrip_failures"] for r in report["languages"].values()):
        lines.append("WARNING: decode(encode(x)) != normalize(x) on some held-out lines")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tokenizer.train",
        description="Train the KELIP-style bilingual byte-level BPE (HF tokenizers). Each corpus file is one "
                    "language stream; lines are sampled so that the file with ratio r contributes floor(r*k) "
                    "lines, k as large as the scarcest file allows (default ratios: KELIP's 2 : 1.5 English : "
                    "Korean by lines when all files are en/ko, else equal). Up to --heldout-lines per file "
                    "(at most 10%) are held out of training and used for the printed report.",
    )
    p.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, one sentence a line")
    p.add_argument("--languages", nargs="+", metavar="LANG", help="language per file (default: from the file name)")
    p.add_argument("--vocab-size", type=int, default=KELIP_VOCAB_SIZE, help="target vocab incl. specials (98304)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--max-lines-per-file", type=int, default=None, help="uniform sample of at most N lines per file")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True, help="lowercase (default on)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="nfc", help="Unicode form (default nfc)")
    p.add_argument("--ratios", nargs="+", type=float, metavar="R", help="line ratio per file (default 2 1.5 for en ko)")
    p.add_argument("--heldout-lines", type=int, default=DEFAULT_HELDOUT_LINES, help="held-out lines per file")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merge (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = train_tokenizer(
            args.corpus, args.out, vocab_size=args.vocab_size, max_lines_per_file=args.max_lines_per_file,
            lowercase=args.lowercase, ratios=args.ratios, heldout_lines=args.heldout_lines, seed=args.seed,
            languages=args.languages, normalization=args.normalization, min_frequency=args.min_frequency,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
