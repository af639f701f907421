"""Write WebDataset shards (format: :mod:`mae.images.shards`) from a caption manifest or an image
folder (the library: :mod:`clip.data.shards`)::

    python -m clip.shards --manifest pairs.jsonl --out shards/ [--shard-size 1000] [--languages en ko]
    python -m clip.shards --images photos/ --out shards/          # images only, for MAE
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from clip.data.shards import write_shards


def main(argv: Sequence[str] | None = None) -> int:
    w = argparse.ArgumentParser(prog="python -m clip.shards", description=__doc__.split("\n")[0])
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSONL manifest ({'file': ..., captions})")
    src.add_argument("--images", help="plain image folder (images only, for MAE)")
    w.add_argument("--out", required=True, help="output folder (train/ and val/ with --val-fraction)")
    w.add_argument("--shard-size", type=int, default=1000)
    w.add_argument("--languages", nargs="+", default=["en", "ko"])
    w.add_argument("--val-fraction", type=float, default=0.0)
    w.add_argument("--split-key", default="base")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    args = w.parse_args(argv)
    source = args.manifest or args.images
    if args.manifest and not args.manifest.endswith(".jsonl"):
        print(f"error: --manifest must be a .jsonl file: {args.manifest}", file=sys.stderr)
        return 2
    if args.images and not os.path.isdir(args.images):
        print(f"error: image folder not found: {args.images}", file=sys.stderr)
        return 2
    try:
        stats = write_shards(source, args.out, args.shard_size, args.languages, args.val_fraction,
                             args.split_key, args.seed, args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in stats.items():
        print(f"{name}: {s['samples']} samples in {len(s['shards'])} shards; skipped "
              f"{s['skipped_corrupt']} corrupt, {s['skipped_no_caption']} without caption; "
              f"dropped {s['dropped_captions']} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
