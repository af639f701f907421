"""Zero-shot evaluation of a trained bilingual CLIP: classification, retrieval, cross-lingual retrieval.

Follows the protocols of KELIP (Ko et al. 2022: zero-shot classification with English and Korean
class names, zero-shot image-text retrieval R@1/5/10) and Parallel Multilingual CLIP (Krasner & Lanuzo:
per language, accuracy@k of finding the image of a caption and the distribution of
its rank). Metric conventions (1-based ranks, pessimistic ties, ANY-caption hits) are those of
:mod:`clip.metrics`, and every metrics JSON repeats them (``rank_base``, ``ties``).

    python -m clip.eval zeroshot     --checkpoint RUN --data data/emoji/captions.jsonl --label-field group \\
                                     --classnames names.json --out eval/
    python -m clip.eval retrieval    --checkpoint RUN --data data/emoji/captions.jsonl --split val \\
                                     --out eval/
    python -m clip.eval crosslingual --checkpoint RUN --pairs data/parallel/en_ko.tsv --out eval/

``--checkpoint`` is an exported ``clip_ckpt.pt`` or a run folder holding ``clip_ckpt.pt`` and
``tokenizer/``; the tokenizer defaults to that folder's (or the checkpoint's sibling) ``tokenizer/``.
Zero-shot class names come from ``--classnames`` (JSON ``{"en": {label: name}, "ko": {...}}`` or TSV
``label en ko``); without it every language uses the label itself with ``-``/``_`` read as spaces
(e.g. the emoji ``subgroup`` "award-medal" -> "award medal", also in Korean prompts), and the JSON
says ``"classnames": "derived from labels"``.

Legend: N images, M captions, C classes, T templates, E embedding width.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip.eval_io import (
    image_folder_samples, load_model_and_tokenizer, plot_accuracy_at_k, plot_rank_boxplot, print_table,
    read_classnames, read_parallel,
)
from clip.metrics import (  # noqa: F401  (re-exported: the trainer imports them from here)
    RANK_BASE, TIES, accuracy_at_k, metrics_from_ranks, rank_stats, ranks_from_scores,
    retrieval_metrics, retrieval_ranks, topk_accuracy,
)

DEFAULT_TEMPLATES = {
    "en": ["a photo of a {}.", "a picture of a {}.", "an emoji of a {}.", "an icon of a {}.", "a {}."],
    "ko": ["{} 사진", "{}의 사진", "{} 그림", "{} 이모지", "{}"],
}
MAX_K = 10  # accuracy@k is reported for k = 1..MAX_K (the bar charts)


# ----------------------------------------------------------------------------- encoding

@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode and no autograd for the block; the trainer's train mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _context_length(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(getattr(cfg, "text", None), "context_length", None)


def encode_texts(model, tokenizer, texts: Sequence[str], device="cpu", batch_size: int = 256,
                 progress: bool = False) -> torch.Tensor:
    """(M, E) L2-normalised float32 CPU text embeddings, encoded in batches."""
    ctx, out = _context_length(model), []
    with _eval_mode(model):
        for s in tqdm(range(0, len(texts), batch_size), desc="texts", file=sys.stderr, disable=not progress):
            tokens = tokenizer.encode_batch(list(texts[s : s + batch_size]), context_length=ctx)  # (B, T)
            out.append(F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def zeroshot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                        device="cpu", batch_size: int = 256) -> torch.Tensor:
    """(C, E) class embeddings by prompt ensembling: every template filled with the class name,
    the L2-normalised prompt embeddings averaged, the mean renormalised (CLIP, Radford et al. 2021)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every prompt template needs a '{{}}' placeholder: {list(templates)}")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts, device, batch_size)
    emb = emb.view(len(classnames), len(templates), -1)  # (C, T, E)
    return F.normalize(emb.mean(dim=1), dim=-1)


class _SampleImages(torch.utils.data.Dataset):
    """Samples as a dataset: (index, image tensor or None, error). A sample carries a ready
    ``image`` tensor, or a ``path`` / ``file`` (relative to ``root``) loaded and transformed here."""

    def __init__(self, samples: Sequence[Mapping], transform, root):
        self.samples, self.transform, self.root = samples, transform, Path(root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        if isinstance(s.get("image"), torch.Tensor):
            return i, s["image"], None
        try:
            from clip.data import load_rgb
            return i, self.transform(load_rgb(s.get("path") or str(self.root / s["file"]))), None
        except Exception as e:  # an undecodable or missing image is skipped and counted
            return i, None, f"{s.get('file')}: {type(e).__name__}: {e}".replace("\n", " ")


def _collate(batch):
    kept = [(i, x) for i, x, _ in batch if x is not None]
    errors = [e for _, x, e in batch if x is None]
    images = torch.stack([x for _, x in kept]) if kept else None  # (B, 3, H, W)
    return [i for i, _ in kept], images, errors


def _image_batches(samples, transform, root, batch_size, workers):
    """Yield (kept samples, images (B, 3, H, W) or None, n_skipped, errors)."""
    if isinstance(samples, Sequence):
        ds = _SampleImages(samples, transform, root)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                             collate_fn=_collate)
        for idx, images, errors in loader:
            yield [samples[i] for i in idx], images, len(errors), errors
        return
    buf, skipped = [], 0  # an iterable of samples, e.g. clip.data.build_pair_dataset(...)
    for s in samples:
        skipped += int(s.get("n_skipped", 0))
        buf.append(s)
        if len(buf) == batch_size:
            ds = _SampleImages(buf, transform, root)
            idx, images, errors = _collate([ds[i] for i in range(len(buf))])
            yield [buf[i] for i in idx], images, skipped + len(errors), errors
            buf, skipped = [], 0
    if buf or skipped:
        ds = _SampleImages(buf, transform, root)
        idx, images, errors = _collate([ds[i] for i in range(len(buf))])
        yield [buf[i] for i in idx], images, skipped + len(errors), errors


def encode_images(model, samples, device="cpu", transform=None, root=".", batch_size: int = 64,
                  workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, list[dict], int]:
    """Encode images in batches, skipping (and counting) undecodable ones.

    Args:
        samples: a list of dicts with ``path`` (as from clip.data.iter_manifest) or ``file``
            (relative to ``root``), loaded with clip.data.load_rgb and ``transform``, or with a
            ready ``image`` (3, H, W) tensor; or any iterable of such dicts (e.g.
            ``clip.data.build_pair_dataset``, whose ``n_skipped`` counts are added up).
    Returns:
        (embeddings (N, E) float32 CPU, the N kept samples without their ``image``, n_skipped).
    """
    embs, kept, n_skipped, shown = [], [], 0, 0
    total = len(samples) if isinstance(samples, Sequence) else None
    bar = tqdm(total=total, desc="images", file=sys.stderr, disable=not progress)
    with _eval_mode(model):
        for batch, images, skipped, errors in _image_batches(samples, transform, root, batch_size, workers):
            for e in errors[: max(0, 5 - shown)]:
                print(f"clip.eval: skipped image {e}", file=sys.stderr)
            shown += len(errors)
            n_skipped += skipped
            bar.update(len(batch) + len(errors))
            if images is None:
                continue
            images = images.to(device, next(model.parameters(), images).dtype)  # e.g. a bf16 engine module
            embs.append(F.normalize(model.encode_image(images).float(), dim=-1).cpu())
            kept.extend({k: v for k, v in s.items() if k != "image"} for s in batch)
    bar.close()
    if shown > 5:
        print(f"clip.eval: ... {shown} images skipped in all", file=sys.stderr)
    return (torch.cat(embs) if embs else torch.zeros(0, 0)), kept, n_skipped


# ----------------------------------------------------------------------------- the three evaluations

def captions_of(sample: Mapping, lang: str) -> list[str]:
    """Captions of one language, read as training reads them (``clip.data.extract_captions``:
    ``sample["captions"][lang]`` or ``sample[lang]``, list or str, empty ones dropped)."""
    from clip.data import extract_captions
    return extract_captions(sample, [lang])[0].get(lang, [])


def _ranked_section(ranks: torch.Tensor) -> dict:
    stats = rank_stats(ranks)
    return {"accuracy_at_k": {str(k): v for k, v in accuracy_at_k(ranks, range(1, MAX_K + 1)).items()},
            **{f"rank_{k}": v for k, v in stats.items()}}


def evaluate_retrieval(model, tokenizer, samples, languages: Sequence[str] = ("en", "ko"), device="cpu", *,
                       transform=None, root=".", batch_size: int = 64, workers: int = 0,
                       ks: Sequence[int] = (1, 5, 10), progress: bool = False,
                       return_ranks: bool = False) -> dict:
    """Zero-shot image<->text retrieval, per language, over one shared image gallery.

    Args:
        model: a CLIP (``encode_image``/``encode_text``); put in eval mode for the call, then restored.
        tokenizer: ``BilingualTokenizer`` (``encode_batch``).
        samples: manifest rows (``list(clip.data.iter_manifest(m))``: ``{"path", "en", "ko", ...}`` or
            ``{"path", "captions": {lang: [...]}}``; or ``file`` relative to ``root``), read with
            ``transform`` (e.g. ``clip.augment.eval_transform(224)``), or dicts with a ready ``image``
            tensor (e.g. from ``build_pair_dataset``). Images without a caption in any language are dropped.
        languages: caption languages, each evaluated against all N images / its own M captions.
    Returns:
        ``{"languages": {lang: {image_retrieval_recall@k, text_retrieval_recall@k,
        image_retrieval_rank_{mean,median,q1,q3}, text_retrieval_rank_..., n_images, n_texts,
        "text_to_image_accuracy_at_k": {"1".."10": float}}}, "n_images", "n_skipped", "n_no_caption",
        "rank_base": 1, "ties": "pessimistic"}``; with ``return_ranks`` also ``"ranks": {lang:
        {"image_retrieval": (M,), "text_retrieval": (N',)}}`` tensors. A language with no caption gets
        ``{"n_texts": 0}`` only.
    """
    emb, kept, n_skipped = encode_images(model, samples, device, transform, root, batch_size, workers,
                                         progress)
    has_caption = [any(captions_of(s, lang) for lang in languages) for s in kept]
    keep = [i for i, h in enumerate(has_caption) if h]
    emb, kept = emb[keep], [kept[i] for i in keep]
    if not kept:
        raise ValueError("no decodable image with a caption to evaluate")
    result = {"languages": {}, "n_images": len(kept), "n_skipped": n_skipped,
              "n_no_caption": len(has_caption) - len(keep), "rank_base": RANK_BASE, "ties": TIES}
    ranks = {}
    for lang in languages:
        texts, text_image = [], []
        for j, s in enumerate(kept):
            for c in captions_of(s, lang):
                texts.append(c)
                text_image.append(j)
        if not texts:
            result["languages"][lang] = {"n_texts": 0}
            continue
        temb = encode_texts(model, tokenizer, texts, device, max(batch_size, 256), progress)
        t2i, i2t = retrieval_ranks(emb, temb, torch.tensor(text_image))
        section = metrics_from_ranks(t2i, i2t, ks, n_images=len(kept), n_texts=len(texts))
        acc = accuracy_at_k(t2i, range(1, MAX_K + 1))
        section["text_to_image_accuracy_at_k"] = {str(k): v for k, v in acc.items()}
        result["languages"][lang] = section
        ranks[lang] = {"image_retrieval": t2i, "text_retrieval": i2t}
    if return_ranks:
        result["ranks"] = ranks
    return result


def evaluate_zeroshot(model, tokenizer, samples, labels: Sequence[str],
                      classnames: Mapping[str, Sequence[str]],
                      templates: Mapping[str, Sequence[str]] | None = None, label_field: str = "label",
                      device="cpu", *, transform=None, root=".", batch_size: int = 64, workers: int = 0,
                      progress: bool = False, return_ranks: bool = False) -> dict:
    """Zero-shot classification, one classifier per language built from its class names.

    Args:
        samples: as in :func:`evaluate_retrieval`, each with ``sample[label_field]`` in ``labels``.
        labels: the class list (C labels); classes absent from the data still compete.
        classnames: {lang: C names aligned with ``labels``}; the evaluated languages are its keys.
        templates: {lang: prompt templates with ``{}``}; defaults to ``DEFAULT_TEMPLATES``.
    Returns:
        ``{"languages": {lang: {acc1, acc5, mean_per_class_recall, accuracy_at_k, rank_*, n_classes,
        n_templates}}, "n_images", "n_skipped", "rank_base", "ties"}`` (+ ``"ranks"`` if asked).
    """
    index = {lab: i for i, lab in enumerate(labels)}
    emb, kept, n_skipped = encode_images(model, samples, device, transform, root, batch_size, workers,
                                         progress)
    for s in kept:
        if s.get(label_field) not in index:
            raise ValueError(f"label {s.get(label_field)!r} of sample {s.get('key', s.get('file'))!r} "
                             f"is not in the class list ({len(labels)} classes)")
    if not kept:
        raise ValueError("no decodable image to evaluate")
    y = torch.tensor([index[s[label_field]] for s in kept])
    templates = templates or DEFAULT_TEMPLATES
    result = {"languages": {}, "n_images": len(kept), "n_skipped": n_skipped,
              "rank_base": RANK_BASE, "ties": TIES}
    ranks = {}
    for lang, names in classnames.items():
        if len(names) != len(labels):
            raise ValueError(f"{len(names)} {lang} class names for {len(labels)} labels")
        if lang not in templates:
            raise ValueError(f"no prompt templates for language {lang!r}")
        clf = zeroshot_classifier(model, tokenizer, names, templates[lang], device, max(batch_size, 256))
        logits = emb @ clf.T  # (N, C)
        correct = F.one_hot(y, len(labels)).bool()  # (N, C)
        r = ranks_from_scores(logits, correct)
        top1 = (r == 1).double()
        per_class = [float(top1[y == c].mean()) for c in y.unique()]
        ranks[lang] = r
        result["languages"][lang] = {
            "acc1": float(top1.mean()), "acc5": accuracy_at_k(r, [5])[5],
            "mean_per_class_recall": sum(per_class) / len(per_class),
            "n_classes": len(labels), "n_templates": len(templates[lang]), **_ranked_section(r)}
    if return_ranks:
        result["ranks"] = ranks
    return result


def evaluate_crosslingual(model, tokenizer, pairs: Sequence[tuple[str, str]], languages=("en", "ko"),
                          device="cpu", *, batch_size: int = 256, ks: Sequence[int] = (1, 5, 10),
                          progress: bool = False, return_ranks: bool = False) -> dict:
    """Text->text retrieval between two languages from one-to-one parallel pairs (i-th <-> i-th).

    Returns ``{"directions": {"en_to_ko": {recall@k, accuracy_at_k, rank_*}, "ko_to_en": {...}},
    "n_pairs", "rank_base", "ties"}`` (+ ``"ranks"`` if asked).
    """
    a, b = languages
    if not pairs:
        raise ValueError("no parallel pairs to evaluate")
    a_emb = encode_texts(model, tokenizer, [p[0] for p in pairs], device, batch_size, progress)
    b_emb = encode_texts(model, tokenizer, [p[1] for p in pairs], device, batch_size, progress)
    # b plays the "image" gallery: t2i = a -> b, i2t = b -> a
    a2b, b2a = retrieval_ranks(b_emb, a_emb, torch.arange(len(pairs)))
    result = {"directions": {}, "n_pairs": len(pairs), "rank_base": RANK_BASE, "ties": TIES}
    for name, r in ((f"{a}_to_{b}", a2b), (f"{b}_to_{a}", b2a)):
        result["directions"][name] = {**{f"recall@{k}": v for k, v in accuracy_at_k(r, ks).items()},
                                      **_ranked_section(r)}
    if return_ranks:
        result["ranks"] = {f"{a}_to_{b}": a2b, f"{b}_to_{a}": b2a}
    return result


def flatten_metrics(result: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a result as one flat dict for logging: ``{prefix}en/image_retrieval_recall@1``,
    ``{prefix}n_images``... (the ``languages`` / ``directions`` level is left out of the keys)."""
    flat = {}
    for k, v in result.items():
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, prefix if k in ("languages", "directions") else f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = v
    return flat


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clip.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="clip_ckpt.pt or a run folder")
    common.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the checkpoint)")
    common.add_argument("--out", required=True, help="folder for metrics_<task>.json and the charts")
    common.add_argument("--languages", nargs="+", default=["en", "ko"])
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--no-progress", action="store_true")
    rows = argparse.ArgumentParser(add_help=False)
    rows.add_argument("--split", choices=["all", "train", "val"], default="all",
                      help="evaluate only one side of clip.data.split_rows (val = held out from training)")
    rows.add_argument("--val-fraction", type=float, default=0.15)
    rows.add_argument("--split-key", default="base", help="rows sharing this field fall on the same side")
    rows.add_argument("--seed", type=int, default=0)
    rows.add_argument("--max-images", type=int, help="only the first N rows (after the split)")
    rows.add_argument("--workers", type=int, default=0, help="DataLoader workers for image decoding")
    z = sub.add_parser("zeroshot", parents=[common, rows], help="zero-shot classification")
    z.add_argument("--data", required=True, help="image folder (class = subfolder) or JSONL manifest")
    z.add_argument("--label-field", default="label", help="manifest field holding the class label")
    z.add_argument("--classnames", help="JSON {lang: {label: name}} or TSV 'label en ko'; without it every "
                   "language uses the label itself ('-'/'_' as spaces)")
    z.add_argument("--templates", help="JSON {lang: [template with {}...]} (default: built-in prompts)")
    r = sub.add_parser("retrieval", parents=[common, rows], help="image<->text retrieval")
    r.add_argument("--data", "--manifest", dest="manifest", required=True,
                   help="JSONL manifest: file + captions[lang] or lang fields")
    c = sub.add_parser("crosslingual", parents=[common], help="text->text retrieval between languages")
    c.add_argument("--pairs", required=True, help="TSV with the language columns in its header")
    c.add_argument("--max-pairs", type=int, help="only the first N pairs after deduplication")
    return p


def _select_rows(rows: list[dict], args) -> tuple[list[dict], dict]:
    info = {"name": args.split}
    if args.split != "all":
        from clip.data import split_rows
        train, val = split_rows(rows, args.val_fraction, key_field=args.split_key, seed=args.seed)
        rows = val if args.split == "val" else train
        info.update(val_fraction=args.val_fraction, key=args.split_key, seed=args.seed)
    rows = rows[: args.max_images] if args.max_images else rows
    return rows, {**info, "n_rows": len(rows)}


def _load_rows(source: Path, args) -> tuple[list[dict], Path, dict, list[str] | None]:
    """(rows, image root, split info, folder classes or None) of a JSONL manifest or an image folder."""
    if not source.exists():
        raise FileNotFoundError(f"data not found: {source}")
    if source.is_dir():
        if args.task != "zeroshot":
            raise ValueError(f"{args.task} needs a JSONL manifest, got the folder {source}")
        rows, classes = image_folder_samples(str(source))
        return rows, source, {"name": "all", "n_rows": len(rows)}, classes
    from clip.data import iter_manifest
    rows, split = _select_rows(list(iter_manifest(source)), args)
    return rows, source.parent, split, None


def _run_zeroshot(args, progress):
    source = Path(args.data)
    rows, root, split, classes = _load_rows(source, args)
    field, langs = ("label" if classes else args.label_field), list(args.languages)
    if any(field not in r for r in rows):
        raise ValueError(f"{source}: a row has no label field {field!r}")
    if args.classnames:  # checked before the model loads: bad input fails fast
        labels, names = read_classnames(args.classnames, langs)
        unknown = sorted({r[field] for r in rows} - set(labels), key=str)
        if unknown:
            raise ValueError(f"label {unknown[0]!r} ({len(unknown)} unknown in all) "
                             f"is not in {args.classnames}")
    else:
        labels = classes or sorted({r[field] for r in rows}, key=str)
        names = {lang: [str(lab).replace("-", " ").replace("_", " ") for lab in labels] for lang in langs}
        print("clip.eval: no --classnames: every language uses the label text as class name", file=sys.stderr)
    templates = DEFAULT_TEMPLATES
    if args.templates:
        if not Path(args.templates).is_file():
            raise FileNotFoundError(f"template file not found: {args.templates}")
        templates = json.loads(Path(args.templates).read_text(encoding="utf-8"))
    model, tok = load_model_and_tokenizer(args.checkpoint, args.tokenizer, args.device)
    from clip.augment import eval_transform
    res = evaluate_zeroshot(model, tok, rows, labels, names, templates, field, args.device,
                            transform=eval_transform(model.cfg.vision.img_size), root=root,
                            batch_size=args.batch_size, workers=args.workers, progress=progress,
                            return_ranks=True)
    res.update(data=str(source), label_field=field, split=split,
               classnames=str(args.classnames) if args.classnames else "derived from labels",
               templates={lang: list(templates[lang]) for lang in langs})
    sections = res["languages"]
    table = [["language", "acc1", "acc5", "median rank", "classes"]]
    table += [[n, s["acc1"], s["acc5"], s["rank_median"], s["n_classes"]] for n, s in sections.items()]
    return res, {n: s["accuracy_at_k"] for n, s in sections.items()}, res.pop("ranks"), table


def _run_retrieval(args, progress):
    source = Path(args.manifest)
    rows, root, split, _ = _load_rows(source, args)
    model, tok = load_model_and_tokenizer(args.checkpoint, args.tokenizer, args.device)
    from clip.augment import eval_transform
    res = evaluate_retrieval(model, tok, rows, list(args.languages), args.device,
                             transform=eval_transform(model.cfg.vision.img_size), root=root,
                             batch_size=args.batch_size, workers=args.workers, progress=progress,
                             return_ranks=True)
    res.update(manifest=str(source), split=split)
    sections = {n: s for n, s in res["languages"].items() if s["n_texts"]}
    ranks = {f"{n} {d}": r for n, rr in res.pop("ranks").items()
             for d, r in (("text->image", rr["image_retrieval"]), ("image->text", rr["text_retrieval"]))}
    table = [["language", "t->i R@1", "R@5", "R@10", "i->t R@1", "R@5", "R@10", "t->i median rank"]]
    table += [[n] + [s[f"{d}_recall@{k}"] for d in ("image_retrieval", "text_retrieval") for k in (1, 5, 10)]
              + [s["image_retrieval_rank_median"]] for n, s in sections.items()]
    return res, {n: s["text_to_image_accuracy_at_k"] for n, s in sections.items()}, ranks, table


def _run_crosslingual(args, progress):
    langs = list(args.languages)
    if len(langs) != 2:
        raise ValueError(f"crosslingual needs exactly two --languages, got {langs}")
    model, tok = load_model_and_tokenizer(args.checkpoint, args.tokenizer, args.device)
    pairs, dropped = read_parallel(args.pairs, langs, tok.normalize, args.max_pairs)
    res = evaluate_crosslingual(model, tok, pairs, langs, args.device, batch_size=max(args.batch_size, 256),
                                progress=progress, return_ranks=True)
    res.update(pairs=str(args.pairs), n_dropped_duplicates=dropped,
               dedupe="first occurrence kept: a pair is dropped if either side (tokenizer-normalised) "
                      "was seen before")
    sections = res["directions"]
    table = [["direction", "R@1", "R@5", "R@10", "median rank", "q1", "q3"]]
    table += [[n, s["recall@1"], s["recall@5"], s["recall@10"], s["rank_median"], s["rank_q1"], s["rank_q3"]]
              for n, s in sections.items()]
    return res, {n: s["accuracy_at_k"] for n, s in sections.items()}, res.pop("ranks"), table


def _run(args) -> dict:
    """Evaluate, then write metrics_<task>.json and the two charts into --out and print the table."""
    progress = not args.no_progress and sys.stderr.isatty()
    tasks = {"zeroshot": _run_zeroshot, "retrieval": _run_retrieval, "crosslingual": _run_crosslingual}
    res, acc, ranks, table = tasks[args.task](args, progress)
    res = {"task": args.task, "checkpoint": str(args.checkpoint), **res,
           "charts": [f"{args.task}_accuracy_at_k.png", f"{args.task}_ranks.png"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_at_k(acc, out / res["charts"][0], f"{args.task}: accuracy@k")
    plot_rank_boxplot(ranks, out / res["charts"][1], f"{args.task}: rank of the correct item (log scale)")
    path = out / f"metrics_{args.task}.json"
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_table(table[0], table[1:])
    print(f"ranks are 1-based, ties pessimistic; {res.get('n_images', res.get('n_pairs'))} evaluated, "
          f"{res.get('n_skipped', 0)} skipped -> {path}")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; bad input is one line on stderr and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = " ".join(str(e).split())
        print(f"clip.eval: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
