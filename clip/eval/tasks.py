"""Evaluation of a bilingual CLIP: retrieval, zero-shot classification, cross-lingual retrieval,
and the trainer's held-out validation: the library that ``python -m clip.eval`` and the CLIP trainer call.

Follows KELIP (Ko et al. 2022: zero-shot classification with English and Korean class names,
image-text retrieval R@1/5/10) and Parallel Multilingual CLIP (Krasner & Lanuzo: per language,
accuracy@k of finding the image of a caption and the distribution of its rank). Metric
conventions (1-based ranks, pessimistic ties, ANY-caption hits, chance level) are those of
:mod:`clip.eval.metrics`; every result repeats them (``rank_base``, ``ties``).

Direction names: ``image_to_text`` finds a caption of an image among all M captions,
``text_to_image`` finds the image of a caption among all N images.

Legend: N images, M captions, C classes / caption slots, E embedding width.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from clip.eval.encode import (
    captions_of, encode_images, encode_language_captions, encode_texts, eval_mode, zeroshot_classifier,
)
from clip.model.loss import ClipLoss
from clip.eval.metrics import (
    RANK_BASE, TIES, accuracy_at_k, class_ranks, curve_ks, metrics_from_ranks, rank_stats, retrieval_ranks,
)

DEFAULT_TEMPLATES = {
    "en": ["a photo of a {}.", "a picture of a {}.", "an emoji of a {}.", "an icon of a {}.", "a {}."],
    "ko": ["{} 사진", "{}의 사진", "{} 그림", "{} 이모지", "{}"],
}
CONVENTIONS = {"rank_base": RANK_BASE, "ties": TIES}


def _ranked_section(ranks: torch.Tensor, n_candidates: int) -> dict:
    """accuracy@k for k = 1..min(10, n_candidates) and the rank statistics of one query set."""
    acc = accuracy_at_k(ranks, curve_ks(n_candidates))
    return {"accuracy_at_k": {str(k): v for k, v in acc.items()},
            **{f"rank_{k}": v for k, v in rank_stats(ranks).items()}}


# ----------------------------------------------------------------------------- retrieval

@dataclass
class _Gallery:
    images: torch.Tensor  # (N, E) the decodable images with a caption in some language
    captions: dict[str, tuple[torch.Tensor, torch.Tensor]]  # {lang: ((M, E), (M,) image index)}
    n_skipped: int  # undecodable images
    n_no_caption: int  # decodable images without a caption in any language


def _gallery(model, tokenizer, samples, languages, device, *, transform=None, root=".", batch_size=64,
             workers=0, progress=False) -> _Gallery:
    emb, kept, n_skipped = encode_images(model, samples, device, transform, root, batch_size, workers,
                                         progress)
    keep = [i for i, s in enumerate(kept) if any(captions_of(s, lang) for lang in languages)]
    if not keep:
        raise ValueError("no decodable image with a caption to evaluate")
    kept = [kept[i] for i in keep]
    captions = encode_language_captions(model, tokenizer, kept, languages, device, max(batch_size, 256),
                                        progress)
    return _Gallery(emb[keep], captions, n_skipped, len(emb) - len(keep))


def _retrieval_sections(g: _Gallery, languages, ks) -> tuple[dict, dict]:
    """({lang: metrics}, {lang: {"text_to_image": (M,), "image_to_text": (N',)} ranks})."""
    sections, ranks = {}, {}
    n = len(g.images)
    for lang in languages:
        if lang not in g.captions:
            sections[lang] = {"n_texts": 0}
            continue
        temb, text_image = g.captions[lang]
        t2i, i2t = retrieval_ranks(g.images, temb, text_image)
        sections[lang] = metrics_from_ranks(t2i, i2t, ks, n_images=n, n_texts=len(temb))
        acc = accuracy_at_k(t2i, curve_ks(n))
        sections[lang]["text_to_image_accuracy_at_k"] = {str(k): v for k, v in acc.items()}
        acc = accuracy_at_k(i2t, curve_ks(len(temb)))
        sections[lang]["image_to_text_accuracy_at_k"] = {str(k): v for k, v in acc.items()}
        ranks[lang] = {"text_to_image": t2i, "image_to_text": i2t}
    return sections, ranks


def evaluate_retrieval(model, tokenizer, samples, languages: Sequence[str] = ("en", "ko"), device="cpu", *,
                       transform=None, root=".", batch_size: int = 64, workers: int = 0,
                       ks: Sequence[int] = (1, 5, 10), progress: bool = False,
                       return_ranks: bool = False) -> dict:
    """Zero-shot image<->text retrieval, per language, over one shared image gallery.

    Args:
        model: a CLIP (``encode_image``/``encode_text``); put in eval mode for the call, then restored.
        tokenizer: ``BilingualTokenizer`` (``encode_batch``).
        samples: manifest rows (``list(mae.images.sources.iter_manifest(m))``: ``{"path", "en", "ko", ...}`` or
            ``{"path", "captions": {lang: [...]}}``; or ``file`` relative to ``root``), read with
            ``transform`` (default: the model's :func:`clip.eval.encode.eval_view`), or dicts with a ready ``image``
            tensor. Images without a caption in any language are dropped.
        languages: caption languages, each evaluated against all N images / all its M captions.
        batch_size: images per batch (texts: at least 256 per batch).
    Returns:
        ``{"languages": {lang: {image_to_text_R@k, text_to_image_R@k, {direction}_rank_{mean,median,q1,q3},
        n_images, n_texts, "text_to_image_accuracy_at_k": {"1".."min(10, N)": float},
        "image_to_text_accuracy_at_k": {"1".."min(10, M)": float}}}, "n_images",
        "n_skipped", "n_no_caption", "rank_base": 1, "ties": "pessimistic"}``; with ``return_ranks`` also
        ``"ranks": {lang: {"text_to_image": (M,), "image_to_text": (N',)}}``. A language with no
        caption gets ``{"n_texts": 0}`` only.
    """
    g = _gallery(model, tokenizer, samples, languages, device, transform=transform, root=root,
                 batch_size=batch_size, workers=workers, progress=progress)
    sections, ranks = _retrieval_sections(g, languages, ks)
    result = {"languages": sections, "n_images": len(g.images), "n_skipped": g.n_skipped,
              "n_no_caption": g.n_no_caption, **CONVENTIONS}
    return {**result, "ranks": ranks} if return_ranks else result


# ----------------------------------------------------------------------------- held-out validation

def heldout_loss(img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor,
                 batch_size: int) -> float:
    """Mean symmetric InfoNCE over batches of ``batch_size`` images drawn by a fixed random
    partition (``randperm`` seeded 0), as open_clip's validation loss.

    Batches as large as a training step's contrastive batch put the loss on the scale and chance
    level of the training loss (over all N at once it would sit near ln N). A short last batch
    has an easier, lower-chance loss and is dropped unless it is the only one.

    Args:
        img: (N, E) image features; txt: (N, C, E) caption-slot features; mask: (N, C) valid slots;
        scale: the logit scale (exp'd temperature).
    """
    n = len(img)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(img.device)
    chunks = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < batch_size:
        chunks.pop()
    total = sum(ClipLoss()(img[c][None], txt[c], mask[c], scale).item() * len(c) for c in chunks)
    return total / sum(len(c) for c in chunks)


def _first_caption_slots(g: _Gallery, languages) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, E) features of each image's first caption per language, (N, C) mask of the filled slots."""
    n, e = g.images.shape
    txt, mask = torch.zeros(n, len(languages), e), torch.zeros(n, len(languages), dtype=torch.bool)
    for c, lang in enumerate(languages):
        if lang not in g.captions:
            continue
        temb, text_image = g.captions[lang]  # captions in image order
        first = torch.ones(len(text_image), dtype=torch.bool)
        first[1:] = text_image[1:] != text_image[:-1]
        txt[text_image[first], c] = temb[first]
        mask[text_image[first], c] = True
    return txt, mask


def evaluate_heldout(model, tokenizer, rows, languages, device, *, loss_batch_size: int, transform=None,
                     ks=(1, 5, 10), batch_size: int = 64) -> dict[str, float]:
    """Held-out metrics for the trainer: ``{"loss", f"{lang}/image_to_text_R@{k}",
    f"{lang}/text_to_image_R@{k}"}`` for each language with captions and each k.

    Recall is :func:`evaluate_retrieval` on ``rows`` (every caption of each language), the same
    figures as ``python -m clip.eval retrieval`` on those rows. ``loss`` is :func:`heldout_loss`
    with ``loss_batch_size`` images per batch, each image's caption slots holding the first caption
    of each language (masked where it has none), at ``model.scale()``.

    Args:
        rows: manifest rows with ``path`` and captions (``mae.images.sources.iter_manifest`` / ``clip.data.pairs.split_rows``).
        transform: the image transform of rows without a ready ``image`` (default: the model's
            :func:`clip.eval.encode.eval_view`).
        batch_size: images per encoding batch. Metrics are computed in float32 on the CPU, whatever
            the model's parameter dtype; its train/eval mode is restored after the call.
    """
    languages = list(languages)
    with eval_mode(model):
        g = _gallery(model, tokenizer, rows, languages, device, transform=transform, batch_size=batch_size)
        sections, _ = _retrieval_sections(g, languages, ks)
        txt, mask = _first_caption_slots(g, languages)
        loss = heldout_loss(g.images, txt, mask, model.scale().float().cpu(), loss_batch_size)
    flat = flatten_metrics({"languages": sections})
    return {"loss": loss, **{k: v for k, v in flat.items() if "_R@" in k}}


# ----------------------------------------------------------------------------- zero-shot, cross-lingual

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
        ``{"languages": {lang: {acc1, acc5, mean_per_class_recall, accuracy_at_k ("1".."min(10, C)"),
        rank_*, n_classes, n_templates}}, "n_images", "n_skipped", "rank_base", "ties"}``
        (+ ``"ranks": {lang: (N,)}`` if asked).
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
    result = {"languages": {}, "n_images": len(kept), "n_skipped": n_skipped, **CONVENTIONS}
    ranks = {}
    for lang, names in classnames.items():
        if len(names) != len(labels):
            raise ValueError(f"{len(names)} {lang} class names for {len(labels)} labels")
        if lang not in templates:
            raise ValueError(f"no prompt templates for language {lang!r}")
        clf = zeroshot_classifier(model, tokenizer, names, templates[lang], device, max(batch_size, 256))
        r = ranks[lang] = class_ranks(emb @ clf.T, y)  # logits (N, C)
        top1 = (r == 1).double()
        per_class = [float(top1[y == c].mean()) for c in y.unique()]
        result["languages"][lang] = {
            "acc1": float(top1.mean()), "acc5": accuracy_at_k(r, [5])[5],
            "mean_per_class_recall": sum(per_class) / len(per_class),
            "n_classes": len(labels), "n_templates": len(templates[lang]), **_ranked_section(r, len(labels))}
    return {**result, "ranks": ranks} if return_ranks else result


def evaluate_crosslingual(model, tokenizer, pairs: Sequence[tuple[str, str]], languages=("en", "ko"),
                          device="cpu", *, batch_size: int = 256, ks: Sequence[int] = (1, 5, 10),
                          progress: bool = False, return_ranks: bool = False) -> dict:
    """Text->text retrieval between two languages from one-to-one parallel pairs (i-th <-> i-th).

    Returns ``{"directions": {"en_to_ko": {R@k, accuracy_at_k ("1".."min(10, pairs)"), rank_*},
    "ko_to_en": {...}}, "n_pairs", "rank_base", "ties"}`` (+ ``"ranks": {direction: (pairs,)}``).
    """
    a, b = languages
    if not pairs:
        raise ValueError("no parallel pairs to evaluate")
    a_emb = encode_texts(model, tokenizer, [p[0] for p in pairs], device, batch_size, progress)
    b_emb = encode_texts(model, tokenizer, [p[1] for p in pairs], device, batch_size, progress)
    # b plays the image gallery: its text_to_image is a -> b, its image_to_text b -> a
    a2b, b2a = retrieval_ranks(b_emb, a_emb, torch.arange(len(pairs)))
    ranks = {f"{a}_to_{b}": a2b, f"{b}_to_{a}": b2a}
    result = {"directions": {}, "n_pairs": len(pairs), **CONVENTIONS}
    for name, r in ranks.items():
        result["directions"][name] = {**{f"R@{k}": v for k, v in accuracy_at_k(r, ks).items()},
                                      **_ranked_section(r, len(pairs))}
    return {**result, "ranks": ranks} if return_ranks else result


def flatten_metrics(result: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a result as one flat dict for logging: ``{prefix}en/image_to_text_R@1``,
    ``{prefix}n_images``... (the ``languages`` / ``directions`` level is left out of the keys)."""
    flat = {}
    for k, v in result.items():
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, prefix if k in ("languages", "directions") else f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"{prefix}{k}"] = v
    return flat

