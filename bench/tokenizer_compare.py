"""Benchmark the KELIP-style bilingual BPE against CLIP's original English BPE.

1. Trains the 98K tokenizer (``tokenizer.train.train_tokenizer`` with its default settings) on the
   full shared corpus and times it.
2. On the held-out lines of that run (never trained on), compares ours with CLIP's BPE as open_clip
   ships it (``open_clip.get_tokenizer("ViT-B-32")``, vocab file inside the package, no download):
   tokens per sentence for Korean and English, share cut at 77 tokens, and batch-encode throughput
   to ``(B, 77)`` tensors.

Usage: ``python bench/tokenizer_compare.py [--en EN.txt --ko KO.txt] [--tokenizer-dir DIR]``. Exits 0 with
a message when the corpus is absent.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent

SHARED = _HERE.parent.parent / "shared" / "data" / "corpus"


def _throughput(encode, texts: list[str], batch_size: int, repeats: int) -> float:
    """Median sentences/s of ``encode`` over ``texts`` in batches."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            out = encode(texts[i: i + batch_size])
            assert out.shape[1] == 77
        times.append(time.perf_counter() - t0)
    return len(texts) / statistics.median(times)


def _fertility(encode_one, texts: list[str]) -> tuple[float, float]:
    """(tokens per sentence without SOT/EOT, share of sentences cut at a 77-token context)."""
    counts = [len(encode_one(t)) for t in texts]
    return sum(counts) / len(counts), sum(c + 2 > 77 for c in counts) / len(counts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--en", default=str(SHARED / "en.txt"), help="English corpus (default: shared corpus)")
    p.add_argument("--ko", default=str(SHARED / "ko.txt"), help="Korean corpus (default: shared corpus)")
    p.add_argument("--vocab-size", type=int, default=98304)
    p.add_argument("--tokenizer-dir", help="use this trained tokenizer instead of training one")
    p.add_argument("--out", help="where to write the trained tokenizer (default: a temporary folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    missing = [f for f in (args.en, args.ko) if not Path(f).is_file()]
    if missing:
        print(f"skip: corpus not found: {', '.join(missing)}")
        return 0

    from tokenizer import BilingualTokenizer
    from tokenizer.train import format_report, sample_corpus, train_tokenizer

    print(f"cpu cores: {os.cpu_count()}; TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
    tmp = None
    if args.tokenizer_dir:
        tok_dir = args.tokenizer_dir
    else:
        tok_dir = args.out or (tmp := tempfile.TemporaryDirectory()).name
        t0 = time.perf_counter()
        report = train_tokenizer([args.en, args.ko], tok_dir, vocab_size=args.vocab_size)
        print(f"== training {args.vocab_size:,} on the full corpus: {time.perf_counter() - t0:.1f} s wall")
        print(format_report(report))
    ours = BilingualTokenizer.from_dir(tok_dir)

    # The same held-out lines the training run set aside (same defaults and seed).
    train_meta = ours.meta.get("training", {})
    streams = sample_corpus([args.en, args.ko], max_lines_per_file=train_meta.get("max_lines_per_file"),
                            heldout_lines=train_meta.get("heldout_lines", 2000), seed=train_meta.get("seed", 0))
    heldout = {s.language: s.heldout for s in streams}

    import open_clip
    from open_clip.tokenizer import default_bpe

    clip = open_clip.get_tokenizer("ViT-B-32")
    print(f"== CLIP BPE: {type(clip).__name__}, vocab {len(clip.encoder):,}, file {default_bpe()} "
          f"(exists: {Path(default_bpe()).is_file()})")

    rows = {}
    for lang, texts in heldout.items():
        ours_tpl, ours_cut = _fertility(ours.encode, texts)
        clip_tpl, clip_cut = _fertility(clip.eval.encode, texts)
        ours_sps = _throughput(ours.encode_batch, texts, args.batch_size, args.repeats)
        clip_sps = _throughput(clip, texts, args.batch_size, args.repeats)
        rows[lang] = (len(texts), ours_tpl, clip_tpl, ours_cut, clip_cut, ours_sps, clip_sps)

    print(f"== held-out sentences, batch {args.batch_size}, median of {args.repeats}")
    print(f"{'lang':4} {'n':>5} {'tok/sent ours':>13} {'CLIP':>7} {'ours/CLIP':>9} {'cut77 ours':>10} {'CLIP':>6} "
          f"{'sent/s ours':>11} {'CLIP':>8} {'ours/CLIP':>9}")
    for lang, (n, otpl, ctpl, ocut, ccut, osps, csps) in rows.items():
        print(f"{lang:4} {n:5d} {otpl:13.2f} {ctpl:7.2f} {otpl / ctpl:9.3f} {ocut:10.2%} {ccut:6.2%} "
              f"{osps:11,.0f} {csps:8,.0f} {osps / csps:9.1f}x")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
