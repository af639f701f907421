"""Weighted caption variants, drawn by the training collate (``data.caption_weights``).

A sample may say where each caption came from: ``"caption_sources": {lang: [source, ...]}``
beside ``"captions"``, one source per caption (e.g. ``"original"``, ``"translated"``); without it a
caption's source is ``"original"``. In ``caption_mode: sample`` a caption is drawn by
:func:`draw_caption`: first a variant (``lang:source``) among those present, with probability
proportional to its weight (keys ``"ko:translated"``, ``"ko"`` or ``"translated"``, the most
specific that is given; 1 otherwise), then a caption of that variant uniformly, as open_clip's
``--json-text-key-probs`` picks a key, then its text. (The online keep draw of a curated crawl is
:mod:`mae.images.keep`.)
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

# ----------------------------------------------------------------------------- caption variants
def caption_sources(meta: Mapping, captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The source of each caption in ``captions`` (cleaned captions, e.g. from
    :func:`clip.data.pairs.extract_captions`), looked up by text in ``meta["caption_sources"]``
    (parallel to ``meta["captions"]``); ``"original"`` where none is given."""
    caps, srcs = meta.get("captions"), meta.get("caption_sources")
    known: dict[str, str] = {}
    if isinstance(caps, Mapping) and isinstance(srcs, Mapping):
        for lang, texts in caps.items():
            texts = texts if isinstance(texts, list) else [texts]
            for t, src in zip(texts, srcs.get(lang) or ()):
                if isinstance(t, str) and isinstance(src, str):
                    known[t.strip()] = src
    return {lang: [known.get(t, "original") for t in texts] for lang, texts in captions.items()}


def variant_weight(weights: Mapping[str, float], lang: str, source: str) -> float:
    """The weight of captions of ``source`` in ``lang``: ``weights["lang:source"]``, else
    ``weights[lang]``, else ``weights[source]``, else 1."""
    for k in (f"{lang}:{source}", lang, source):
        if k in weights:
            return float(weights[k])
    return 1.0


def draw_caption(captions: Mapping[str, Sequence[str]], weights: Mapping[str, float], rng: random.Random,
                 sources: Mapping[str, Sequence[str]] | None = None) -> tuple[str, str] | None:
    """``(language, caption)`` drawn as the module docstring says, or None when there is no caption
    (or every variant present weighs 0).

    Args:
        captions: ``{lang: [caption, ...]}`` (a pair sample's ``captions``).
        weights: ``data.caption_weights``.
        rng: the collate's generator (its draws make the batch reproducible).
        sources: the source of each caption, parallel to ``captions`` (:func:`caption_sources`).
    """
    variants: dict[tuple[str, str], list[str]] = {}
    for lang, caps in captions.items():
        srcs = (sources or {}).get(lang) or ()
        for i, c in enumerate(caps):
            variants.setdefault((lang, srcs[i] if i < len(srcs) else "original"), []).append(c)
    keys = [k for k in variants if variant_weight(weights, *k) > 0]
    if not keys:
        return None
    lang, source = rng.choices(keys, [variant_weight(weights, *k) for k in keys])[0]
    return lang, rng.choice(variants[(lang, source)])
