"""Zero-shot evaluation of a trained bilingual CLIP from the command line: classification,
retrieval, cross-lingual retrieval. The evaluations themselves live in :mod:`clip.eval.tasks`.

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

Languages never trained on are evaluated like the others and marked ``seen_in_training: false``
(the checkpoint records its training languages). Retrieval also reads the multilingual layouts of
:mod:`clip.eval.layouts` (``--layout xm3600|xtd10``; ``--languages all`` takes every language in the
data), zero-shot the Babel-ImageNet class names of ``clip-benchmark`` (``--babel-imagenet``):

    python -m clip.eval retrieval --checkpoint RUN --layout xtd10 --data XTD10/ --languages en ko de zh --out eval/
    python -m clip.eval zeroshot  --checkpoint RUN --data imagenet_val.jsonl --label-field label \
                                  --babel-imagenet --languages en ko de --out eval/

Writes ``metrics_<task>.json``, ``<task>_accuracy_at_k.png`` (with the chance level k / N: N images,
classes or pairs) and ``<task>_ranks.png`` into ``--out`` and prints a table. Bad input is one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clip.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="clip_ckpt.pt or a run folder")
    common.add_argument("--tokenizer", help="tokenizer folder (default: tokenizer/ beside the checkpoint)")
    common.add_argument("--out", help="folder for metrics_<task>.json and the charts (without it: the table only)")
    common.add_argument("--languages", nargs="+", default=["en", "ko"],
                        help="caption / class-name languages; 'all' (retrieval): every language in the data")
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--no-progress", action="store_true")
    rows = argparse.ArgumentParser(add_help=False)
    rows.add_argument("--split", choices=["all", "train", "val"], default="all",
                      help="evaluate only one side of clip.data.pairs.split_rows (val = held out from training)")
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
    z.add_argument("--babel-imagenet", nargs="?", const="", metavar="JSON",
                   help="Babel-ImageNet class names and prompts per language (default: the files inside the "
                        "installed clip_benchmark); the label field holds ImageNet class indices 0..999")
    r = sub.add_parser("retrieval", parents=[common, rows], help="image<->text retrieval")
    r.add_argument("--data", "--manifest", dest="manifest", required=True,
                   help="JSONL manifest (file + captions[lang] or lang fields), or a Crossmodal-3600 / XTD10 folder")
    r.add_argument("--layout", choices=["manifest", "xm3600", "xtd10"], default="manifest",
                   help="how --data is laid out (clip.eval.layouts)")
    c = sub.add_parser("crosslingual", parents=[common], help="text->text retrieval between languages")
    c.add_argument("--pairs", required=True, help="TSV with the language columns in its header")
    c.add_argument("--max-pairs", type=int, help="only the first N pairs after deduplication")
    return p


@dataclass
class _Report:
    """What a task hands to :func:`_write`: the JSON, the chart series and the printed table."""

    result: dict
    curves: dict[str, dict[str, float]]  # accuracy@k series for the bar chart
    ranks: dict[str, torch.Tensor]  # rank series for the box plot
    table: list[list]  # header row, then one row per language / direction
    chart: tuple[str, str, int, str]  # title, y label, chance candidates K, what K counts
    more: tuple = ()  # further accuracy@k charts: (name, curves, title, y label, K, what K counts)


def _rows(source: str, args, allow_folder: bool = False):
    from clip.eval.inputs import load_rows
    return load_rows(source, args.split, args.val_fraction, args.split_key, args.seed, args.max_images,
                     allow_folder)


def _image_options(args, model, root, progress) -> dict:
    return dict(root=root, batch_size=args.batch_size,
                workers=args.workers, progress=progress, return_ranks=True)


def _zeroshot(args, progress) -> _Report:
    from clip.eval.inputs import class_names, read_templates
    from clip.model.checkpoint import load_clip_and_tokenizer
    from clip.eval.tasks import DEFAULT_TEMPLATES, evaluate_zeroshot

    rows, root, split, classes = _rows(args.data, args, allow_folder=True)
    field, langs = ("label" if classes else args.label_field), list(args.languages)
    if any(field not in r for r in rows):
        raise ValueError(f"{args.data}: a row has no label field {field!r}")
    if args.babel_imagenet is not None:
        return _zeroshot_babel(args, progress, rows, root, split, field, langs)
    labels, names = class_names(rows, field, langs, args.classnames, classes)  # before the model loads
    if not args.classnames:
        print("clip.eval: no --classnames: every language uses the label text as class name", file=sys.stderr)
    templates = read_templates(args.templates) if args.templates else DEFAULT_TEMPLATES
    model, tok = load_clip_and_tokenizer(args.checkpoint, args.tokenizer, args.device)
    res = evaluate_zeroshot(model, tok, rows, labels, names, templates, field, args.device,
                            **_image_options(args, model, root, progress))
    _mark_seen(res["languages"], model)
    res.update(data=str(args.data), label_field=field, split=split,
               classnames=str(args.classnames) if args.classnames else "derived from labels",
               templates={lang: list(templates[lang]) for lang in langs})
    sections = res["languages"]
    table = [["language", "acc1", "acc5", "median rank", "classes", "seen"]]
    table += [[n, s["acc1"], s["acc5"], s["rank_median"], s["n_classes"], _seen(s)] for n, s in sections.items()]
    return _Report(res, {n: s["accuracy_at_k"] for n, s in sections.items()}, res.pop("ranks"), table,
                   ("zero-shot classification: top-k accuracy", "top-k accuracy", len(labels), "classes"))


def _zeroshot_babel(args, progress, rows, root, split, field, langs) -> _Report:
    """Zero-shot over Babel-ImageNet: each language its own class subset, names and prompts; the
    images of classes a language does not name are left out of that language's figures."""
    from clip.eval.inputs import read_templates
    from clip.model.checkpoint import load_clip_and_tokenizer
    from clip.eval.tasks import evaluate_zeroshot
    from clip.eval.layouts import babel_imagenet

    tables = babel_imagenet(langs, args.babel_imagenet or None)
    if args.templates:  # e.g. fewer prompts than Babel-ImageNet's 80 per language
        own = read_templates(args.templates)
        tables = {lang: (labels, names, own.get(lang, temps)) for lang, (labels, names, temps) in tables.items()}
    model, tok = load_clip_and_tokenizer(args.checkpoint, args.tokenizer, args.device)
    res = {"languages": {}, "ranks": {}, "n_images": 0, "n_skipped": 0}
    for lang, (labels, names, templates) in tables.items():
        index = set(labels)
        mine = [r for r in rows if str(r[field]) in index]
        if not mine:
            raise ValueError(f"no image of {args.data} has a Babel-ImageNet class that {lang!r} names")
        mine = [{**r, field: str(r[field])} for r in mine]
        part = evaluate_zeroshot(model, tok, mine, labels, {lang: names}, {lang: templates}, field, args.device,
                                 **_image_options(args, model, root, progress))
        res["languages"][lang] = {**part["languages"][lang], "n_images": part["n_images"]}
        res["ranks"][lang] = part["ranks"][lang]
        res["n_images"], res["n_skipped"] = max(res["n_images"], part["n_images"]), part["n_skipped"]
        res.update({k: part[k] for k in ("rank_base", "ties")})
    _mark_seen(res["languages"], model)
    res.update(data=str(args.data), label_field=field, split=split, classnames="Babel-ImageNet")
    sections = res["languages"]
    table = [["language", "acc1", "acc5", "median rank", "classes", "images", "seen"]]
    table += [[n, s["acc1"], s["acc5"], s["rank_median"], s["n_classes"], s["n_images"], _seen(s)]
              for n, s in sections.items()]
    n_classes = max(s["n_classes"] for s in sections.values())
    return _Report(res, {n: s["accuracy_at_k"] for n, s in sections.items()}, res.pop("ranks"), table,
                   ("zero-shot classification (Babel-ImageNet): top-k accuracy", "top-k accuracy", n_classes,
                    "classes"))


def _mark_seen(sections: dict, model) -> None:
    """``seen_in_training`` per language: was it among the caption languages the checkpoint trained on
    (None when the checkpoint does not say)?"""
    trained = getattr(model, "trained_languages", None)
    for lang, sec in sections.items():
        sec["seen_in_training"] = None if trained is None else lang in trained


def _seen(section: dict) -> str:
    return {True: "yes", False: "no (unseen)", None: "?"}[section.get("seen_in_training")]


def _retrieval(args, progress) -> _Report:
    from clip.model.checkpoint import load_clip_and_tokenizer
    from clip.eval.tasks import evaluate_retrieval
    from clip.eval.layouts import manifest_languages, read_layout

    langs = None if args.languages == ["all"] else list(args.languages)
    if args.layout == "manifest":
        rows, root, split, _ = _rows(args.manifest, args)
    else:
        rows, root, split = read_layout(args.layout, args.manifest, langs), Path(args.manifest), {"name": "all"}
        rows = rows[:args.max_images] if args.max_images else rows
        split["n_rows"] = len(rows)
    langs = langs or manifest_languages(rows)
    if not langs:
        raise ValueError(f"{args.manifest}: no caption language found; name them with --languages")
    model, tok = load_clip_and_tokenizer(args.checkpoint, args.tokenizer, args.device)
    res = evaluate_retrieval(model, tok, rows, langs, args.device,
                             **_image_options(args, model, root, progress))
    res.update(manifest=str(args.manifest), layout=args.layout, split=split,
               trained_languages=getattr(model, "trained_languages", None))
    _mark_seen(res["languages"], model)
    sections = {n: s for n, s in res["languages"].items() if s["n_texts"]}
    ranks = {f"{n} {d.replace('_to_', '->')}": r for n, rr in res.pop("ranks").items() for d, r in rr.items()}
    table = [["language", "t->i R@1", "R@5", "R@10", "i->t R@1", "R@5", "R@10", "t->i median rank", "seen"]]
    table += [[n] + [s[f"{d}_R@{k}"] for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
              + [s["text_to_image_rank_median"], _seen(s)] for n, s in sections.items()]
    i2t = ("image_to_text_accuracy_at_k", {n: s["image_to_text_accuracy_at_k"] for n, s in sections.items()},
           "retrieval: image->text (find a caption of an image)", "image->text recall@k", res["n_images"],
           "images, one caption each")
    return _Report(res, {n: s["text_to_image_accuracy_at_k"] for n, s in sections.items()}, ranks, table,
                   ("retrieval: text->image (find the image of a caption)", "text->image recall@k",
                    res["n_images"], "images"), (i2t,))


def _crosslingual(args, progress) -> _Report:
    from clip.eval.inputs import read_parallel
    from clip.model.checkpoint import load_clip_and_tokenizer
    from clip.eval.tasks import evaluate_crosslingual

    langs = list(args.languages)
    if len(langs) != 2:
        raise ValueError(f"crosslingual needs exactly two --languages, got {langs}")
    model, tok = load_clip_and_tokenizer(args.checkpoint, args.tokenizer, args.device)
    pairs, dropped = read_parallel(args.pairs, langs, tok.normalize, args.max_pairs)
    res = evaluate_crosslingual(model, tok, pairs, langs, args.device, batch_size=max(args.batch_size, 256),
                                progress=progress, return_ranks=True)
    res.update(pairs=str(args.pairs), n_dropped_duplicates=dropped,
               dedupe="first occurrence kept: a pair is dropped if either side (tokenizer-normalised) "
                      "was seen before")
    sections = res["directions"]
    table = [["direction", "R@1", "R@5", "R@10", "median rank", "q1", "q3"]]
    table += [[n, s["R@1"], s["R@5"], s["R@10"], s["rank_median"], s["rank_q1"], s["rank_q3"]]
              for n, s in sections.items()]
    return _Report(res, {n: s["accuracy_at_k"] for n, s in sections.items()}, res.pop("ranks"), table,
                   ("cross-lingual: find the translation", "recall@k", len(pairs), "pairs"))


def print_table(header: list, rows: list[list]) -> None:
    """A right-aligned text table on stdout (floats with 4 decimals)."""
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _run(args) -> dict:
    """Evaluate, print the table, and with --out write metrics_<task>.json and the two charts there."""
    from clip.eval.charts import plot_accuracy_at_k, plot_rank_boxplot
    from clip.eval.metrics import chance_at_k

    progress = not args.no_progress and sys.stderr.isatty()
    tasks = {"zeroshot": _zeroshot, "retrieval": _retrieval, "crosslingual": _crosslingual}
    rep = tasks[args.task](args, progress)
    res = {"task": args.task, "checkpoint": str(args.checkpoint), **rep.result}
    print_table(rep.table[0], rep.table[1:])
    where = ""
    if args.out:
        from mae.common.files import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        res["charts"] = [f"{args.task}_accuracy_at_k.png", f"{args.task}_ranks.png"]
        for name, curves, title, ylabel, n, what in [(res["charts"][0], rep.curves, *rep.chart)] + [
                (f"{args.task}_{m[0]}.png", *m[1:]) for m in rep.more]:
            ks = sorted({int(k) for acc in curves.values() for k in acc})
            plot_accuracy_at_k(curves, out / name, title, chance_at_k(ks, n), f"chance k/{n} ({what})", ylabel)
        res["charts"] += [f"{args.task}_{m[0]}.png" for m in rep.more]
        title, ylabel, n, what = rep.chart
        plot_rank_boxplot(rep.ranks, out / res["charts"][1], f"{args.task}: rank of the correct item (log scale)",
                          chance=(n + 1) / 2, chance_label=f"chance median ({what}: {n})")
        path = out / f"metrics_{args.task}.json"
        atomic_write_text(path, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        where = f" -> {path}"
    print(f"ranks are 1-based, ties pessimistic; {res.get('n_images', res.get('n_pairs'))} evaluated, "
          f"{res.get('n_skipped', 0)} skipped{where}")
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
