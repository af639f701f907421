"""Balancing by metadata counts, MetaCLIP 2's rule, and the per-language caps.

Counts: ``counts[e]`` is the number of captions (of one language) that match entry ``e``. An
entry's probability is ``min(1, t / counts[e])`` (head entries sampled down to about ``t``
captions, tail entries all kept), and a sample is kept with probability the **max** over its
captions' matched entries (the issue's rule; MetaCLIP 2's code draws each entry independently,
``1 - prod(1 - p_e)``, which keeps a little more of captions matching several head entries).
Because ``min(1, t / c)`` falls with ``c``, a caption's probability is that of its least frequent
entry, so the expected number of kept captions of a language at cap ``t`` is
``sum_m n[m] * min(1, t / m)`` with ``n[m]`` the captions whose least frequent entry is counted
``m`` (:func:`expected_kept`; there are no more distinct ``m`` than entries): the caps can be
searched without another pass over the data. Shares are of captions, exact when a sample carries
captions of one language, as a crawl's do.

Caps: English's ``t_en`` is given, or searched for a target size. Every other language's cap
follows the tail-share rule of MetaCLIP 2's ``curate.py`` (``t_to_p`` / ``p_to_t``): English's
tail share ``p = sum of counts below t_en / sum of counts``, then the language's cap is the count
at which its own sorted counts' cumulative share is closest to ``p`` (:func:`cap_for_share`);
or it is given; or it is searched so that the language holds a target share of the kept
captions (a language that cannot reach it even with everything kept keeps everything).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

def tail_share(counts: np.ndarray, t: float) -> float:
    """The share of all matches that fall on entries counted below ``t`` (MetaCLIP's ``t_to_p``)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total > 0 else 1.0


def cap_for_share(counts: np.ndarray, share: float) -> float:
    """The count at which the cumulative share of the sorted counts is closest to ``share``
    (MetaCLIP's ``p_to_t``); 1 for a language without matches (nothing to cap)."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))
    total = counts.sum()
    if total <= 0:
        return 1.0
    portion = np.cumsum(counts) / total
    return float(counts[int(np.abs(portion - share).argmin())])


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """``min(1, t / counts)`` per entry (1 for entries never matched)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.minimum(1.0, t / np.maximum(counts, 1e-300)).astype(np.float64)


def expected_kept(minima: tuple[np.ndarray, np.ndarray], t: float) -> float:
    """Expected kept captions at cap ``t``; ``minima = (m, n)``: ``n[i]`` captions whose least
    frequent entry is counted ``m[i]``."""
    m, n = minima
    return float((np.asarray(n, dtype=np.float64) * entry_probabilities(m, t)).sum())


def _solve(f, target: float, hi: float) -> float:
    """The smallest ``t`` in ``(0, hi]`` with ``f(t) >= target`` for increasing ``f`` (bisection on
    a log scale); ``hi`` when even ``f(hi)`` falls short."""
    if f(hi) <= target:
        return hi
    lo = 1e-6
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return hi


def solve_caps(counts: Mapping[str, np.ndarray], minima: Mapping[str, tuple], reference: str = "en",
               caps: Mapping[str, float] | None = None, target_size: float | None = None,
               target_share: Mapping[str, float] | None = None, unmatched: Mapping[str, float] | None = None,
               unmatched_prob: float = 0.0) -> dict[str, float]:
    """Every language's cap (module docstring).

    Args:
        counts: per language, matches per entry.
        minima: per language, :func:`expected_kept`'s ``(m, n)``.
        reference: the language whose cap is given or searched (English).
        caps: caps given by the user (``reference`` must be among them unless ``target_size``).
        target_size: expected kept captions over all languages, when ``reference``'s cap is not given.
        target_share: a language's target share of the kept captions (instead of the tail-share rule).
        unmatched, unmatched_prob: captions per language without any match, and their keep probability.
    """
    caps, target_share, unmatched = dict(caps or {}), dict(target_share or {}), dict(unmatched or {})
    if sum(target_share.values()) >= 1:
        raise ValueError(f"target shares {target_share} must add up to less than 1")
    if reference in target_share:
        raise ValueError(f"the reference language {reference!r} takes the rest; give shares for the others")
    langs = list(counts)

    def kept(lang, t):
        return expected_kept(minima[lang], t) + unmatched_prob * unmatched.get(lang, 0)

    def top(lang):
        return float(max(np.max(counts[lang], initial=0), 1))

    def others(t_ref):
        out = {reference: t_ref}
        p = tail_share(counts[reference], t_ref)
        rest = 1 - sum(target_share.values())
        for lang in langs:
            if lang == reference:
                continue
            if lang in caps:
                out[lang] = float(caps[lang])
            elif lang in target_share:
                want = target_share[lang] * kept(reference, t_ref) / rest
                out[lang] = _solve(lambda t, lang=lang: kept(lang, t), want, top(lang))
            else:
                out[lang] = cap_for_share(counts[lang], p)
        return out

    if reference in caps:
        return others(float(caps[reference]))
    if target_size is None:
        raise ValueError(f"give t_{reference} or a target size")
    t_ref = _solve(lambda t: sum(kept(lang, c) for lang, c in others(t).items()), target_size, top(reference))
    return others(t_ref)
