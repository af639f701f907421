"""Caption translation (the library: :mod:`clip.data.translate`)::

    python -m clip.translate --manifest IN.jsonl --model LOCAL_MT_FOLDER --source en --targets es ja hi \\
        --out OUT.jsonl [--batch-size 32] [--device cuda]

Bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from clip.data.translate import build_translators, read_rows, translate_manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clip.translate", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="JSONL manifest (rows with key or file, and captions)")
    p.add_argument("--model", nargs="+", required=True, help="local model folder, or lang=FOLDER per target")
    p.add_argument("--source", default="en")
    p.add_argument("--targets", nargs="+", required=True)
    p.add_argument("--out", required=True, help="JSONL written (appended to when resuming)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per generate call")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.source in args.targets:
            raise ValueError(f"--targets includes the source language {args.source!r}")
        if Path(args.out).resolve() == Path(args.manifest).resolve():
            raise ValueError("--out must differ from --manifest")
        read_rows(Path(args.manifest))  # a bad manifest is reported before any model loads
        translators = build_translators(args.model, args.source, args.targets, args.device, args.max_new_tokens,
                                        args.num_beams)
        stats = translate_manifest(args.manifest, args.out, translators, args.source, args.targets,
                                   args.batch_size, progress=not args.no_progress and sys.stderr.isatty())
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"clip.data.translate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"clip.data.translate: {stats['rows']} rows, {stats['already_done']} already done, {stats['translated']} "
          f"translated into {' '.join(args.targets)}, {stats['no_source_caption']} without a {args.source} caption "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
