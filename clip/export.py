"""Export a trained model for other tools (the library is :mod:`clip.interop.export`):

    python -m clip.export --checkpoint runs/clip --format open_clip --out exported/enko-clip
    python -m clip.export --checkpoint runs/clip --format safetensors --out exported/clip
    python -m clip.export --checkpoint runs/mae/mae_ckpt.pt --format safetensors --out exported/mae

Bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from clip.interop.export import export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clip.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder, clip_ckpt.pt, mae_ckpt.pt or a safetensors folder")
    p.add_argument("--format", required=True, choices=["open_clip", "safetensors"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the checkpoint)")
    p.add_argument("--name", default="enko-clip", help="open_clip model name (NAME.json)")
    p.add_argument("--vision", choices=["auto", "timm", "native"], default="auto",
                   help="open_clip image tower: timm's ViT when one fits (auto), or open_clip's own")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.format, args.out, args.tokenizer, args.name, args.vision)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"clip.interop.export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} as {args.format} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
