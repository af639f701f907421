"""Turn a Hugging Face tokenizer (e.g. KELIP's or OpenAI CLIP's) into a tokenizer folder for the
CLIP stage, with explicit start / end / padding tokens::

    python -m tokenizer.hf_import --hf kelip_tokenizer/ --sot '<s>' --eot '</s>' --pad '[PAD]' --out runs/tokenizer_kelip

then ``deepspeed launch/clip.py --init kelip.pt data.tokenizer=runs/tokenizer_kelip ...``. Bad
input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from tokenizer.bpe import CONTEXT_LENGTH, BilingualTokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenizer.hf_import", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="folder with tokenizer.json (or the file itself)")
    p.add_argument("--sot", required=True, help="start-of-text token, e.g. '<s>' or '<|startoftext|>'")
    p.add_argument("--eot", required=True, help="end-of-text token (the text tower pools here)")
    p.add_argument("--pad", required=True, help="padding token (must differ from --eot)")
    p.add_argument("--context-length", type=int, default=CONTEXT_LENGTH)
    p.add_argument("--out", required=True, help="output tokenizer folder")
    args = p.parse_args(argv)
    try:
        tok = BilingualTokenizer.from_hf(args.hf, args.sot, args.eot, args.pad, args.context_length)
        tok.save(args.out)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"tokenizer.hf_import: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{tok} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
