"""How a trained CLIP sees transparent images under another tool's preprocessing.

open_clip's own ``preprocess`` (used by CLIP_benchmark and most users of an exported model) turns an
RGBA or palette image into RGB with PIL's ``.convert("RGB")``, which keeps whatever colour the
transparent pixels hold (black in the Noto emoji), while our loaders composite them onto white (or,
in training with ``augment.background: random``, onto a random colour). This script exports a run
to open_clip, embeds every transparent bundled emoji PNG through both preprocessings and prints the
cosine between the two embeddings (min, mean), the same with the image flattened onto white before
open_clip's preprocess (``theirs(mae.images.decode.to_rgb(img))``, what a user of the export does
for transparent images), and held-out retrieval under each:

    python bench/transparency.py --run runs/demo/clip [--manifest data/emoji/captions.jsonl]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a CLIP run folder (clip_ckpt.pt + tokenizer/)")
    ap.add_argument("--manifest", default=str(ROOT / "data" / "emoji" / "captions.jsonl"))
    args = ap.parse_args()

    import open_clip

    import clip
    from clip.data.pairs import split_rows
    from clip.eval.tasks import evaluate_retrieval
    from clip.interop.export import export
    from mae.images.decode import has_alpha, to_rgb
    from mae.images.sources import iter_manifest

    model, ours = clip.load(args.run)
    tok = clip.get_tokenizer(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        export(args.run, "open_clip", tmp)
        oc_model, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
    oc_model.eval()
    rows = list(iter_manifest(args.manifest))
    alpha = []
    for r in rows:
        with Image.open(r["path"]) as im:
            if has_alpha(im):
                alpha.append(r)
    flattened = lambda img: theirs(to_rgb(img))  # noqa: E731
    cos, cos_flat = [], []
    with torch.no_grad():
        for i in range(0, len(alpha), 128):
            batch = alpha[i:i + 128]
            a = model.encode_image(torch.stack([ours(Image.open(r["path"])) for r in batch]))
            b = model.encode_image(torch.stack([theirs(Image.open(r["path"])) for r in batch]))
            c = model.encode_image(torch.stack([flattened(Image.open(r["path"])) for r in batch]))
            cos.append((a * b).sum(-1))
            cos_flat.append((a * c).sum(-1))
    print(f"{args.run}: {len(alpha)} of {len(rows)} bundled emoji are transparent")
    for name, c in (("open_clip's preprocess", torch.cat(cos)), ("open_clip's after flattening onto white", torch.cat(cos_flat))):
        print(f"  cosine to our preprocess's embedding, {name}: min {c.min():.3f}, mean {c.mean():.3f}, "
              f"share >= 0.95: {(c >= 0.95).double().mean():.1%}")
    val = split_rows(rows, 0.15, "base", 0)[1]
    for name, transform in (("ours (white)", ours), ("open_clip's preprocess", theirs),
                            ("open_clip's after flattening onto white", flattened)):
        res = evaluate_retrieval(model, tok, [{**r, "image": transform(Image.open(r["path"]))} for r in val], ("en", "ko"))
        print(f"held-out ({res['n_images']} images), {name}: " + ", ".join(
            f"{lang} i->t R@1 {s['image_to_text_R@1']:.2%} R@5 {s['image_to_text_R@5']:.2%}"
            for lang, s in res["languages"].items()))


if __name__ == "__main__":
    main()
