"""Retrieval and classification metrics on embeddings: pure torch, cheap, no model or data.

Used by :mod:`clip.eval.tasks` (the evaluation library behind ``python -m clip.eval`` and the
trainer's held-out validation). Conventions, the same in every function and written into every
metrics JSON:

* Ranks are 1-based: the best possible rank is 1.
* Ties are PESSIMISTIC: the rank of the correct item is 1 + the number of WRONG candidates whose
  score is greater than or EQUAL to the correct item's score. A collapsed model (all scores equal)
  therefore gets the worst rank, never a perfect one. NaN scores count as -inf (also pessimistic).
* Several correct candidates (an image with several captions): the query's rank is that of its
  best-scored correct candidate, so recall@k counts a hit if ANY of them is in the top k (COCO).
* Median and quartiles use linear interpolation between order statistics (numpy's default), so
  the median of an even count is the mean of the two middle ranks.
* Chance level of accuracy@k over K candidates with one right answer is k / K (capped at 1):
  text->image retrieval K = N images, zero-shot K = C classes, cross-lingual K = N pairs.
  accuracy@k is only reported for k <= K: beyond that it is 1 by construction.

Legend: Q queries, K candidates, N images, M texts, E embedding width, C classes.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

RANK_BASE = 1
TIES = "pessimistic"
MAX_K = 10  # accuracy@k curves run over k = 1..min(MAX_K, candidates)


def ranks_from_scores(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of the best correct candidate of each query.

    Args:
        scores: (Q, K) similarity, higher is better.
        correct: (Q, K) bool, True where the candidate is a right answer; every row needs one.
    Returns:
        (Q,) long ranks in [1, K].
    """
    if scores.shape != correct.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and correct {tuple(correct.shape)} "
                         "must be 2-d and of the same shape")
    if scores.shape[0] and not bool(correct.any(dim=1).all()):
        raise ValueError("every query needs at least one correct candidate")
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    beaten_by = (scores >= best) & ~correct  # (Q, K) wrong candidates at least as good
    return 1 + beaten_by.sum(dim=1)


def accuracy_at_k(ranks: torch.Tensor, ks: Iterable[int] = range(1, 11)) -> dict[int, float]:
    """Share of queries whose 1-based rank is <= k, for each k (recall@k / accuracy@k)."""
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise ValueError("accuracy_at_k needs at least one rank")
    return {int(k): float((ranks <= k).double().mean()) for k in ks}


def rank_stats(ranks: torch.Tensor) -> dict[str, float]:
    """Mean, median and quartiles (q1 = 25th, q3 = 75th percentile, linear interpolation) of 1-based ranks."""
    ranks = torch.as_tensor(ranks).double().flatten()
    if ranks.numel() == 0:
        raise ValueError("rank_stats needs at least one rank")
    q = torch.quantile(ranks, torch.tensor([0.25, 0.5, 0.75], dtype=torch.double))
    return {"mean": float(ranks.mean()), "median": float(q[1]), "q1": float(q[0]), "q3": float(q[2])}


def class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1-based pessimistic rank of the true class: logits (N, C), labels (N,) long -> (N,) long."""
    correct = torch.zeros_like(logits, dtype=torch.bool)
    correct[torch.arange(len(labels)), labels] = True  # (N, C) one-hot
    return ranks_from_scores(logits, correct)


def curve_ks(n_candidates: int, max_k: int = MAX_K) -> range:
    """The k of an accuracy@k curve: 1..min(max_k, n_candidates) (beyond, accuracy@k is 1)."""
    return range(1, min(max_k, n_candidates) + 1)


def chance_at_k(ks: Iterable[int], n_candidates: int) -> dict[int, float]:
    """accuracy@k of a random ranking of ``n_candidates`` with one right answer: min(1, k / n)."""
    return {int(k): min(1.0, k / n_candidates) for k in ks}


def retrieval_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of both retrieval directions, computed in query chunks to bound memory.

    Args:
        image_emb: (N, E) L2-normalised image embeddings (the image gallery).
        text_emb: (M, E) L2-normalised caption embeddings (the caption gallery).
        text_image: (M,) long, index into image_emb of each caption's image.
    Returns:
        (text_to_image (M,), image_to_text (N',)) 1-based ranks; image_to_text covers only the N'
        images that have at least one caption, in image order.
    """
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    n, m = image_emb.shape[0], text_emb.shape[0]
    if text_image.shape != (m,):
        raise ValueError(f"text_image has shape {tuple(text_image.shape)}, expected ({m},)")
    if m and (int(text_image.min()) < 0 or int(text_image.max()) >= n):
        raise ValueError(f"text_image indices must lie in [0, {n})")
    image_emb, text_emb = image_emb.float(), text_emb.float()

    t2i = []
    for s in range(0, m, chunk):
        scores = text_emb[s : s + chunk] @ image_emb.T  # (Mc, N)
        correct = torch.zeros_like(scores, dtype=torch.bool)
        correct[torch.arange(scores.shape[0]), text_image[s : s + chunk]] = True
        t2i.append(ranks_from_scores(scores, correct))

    has_text = torch.zeros(n, dtype=torch.bool)
    has_text[text_image] = True
    queries = has_text.nonzero().flatten()
    i2t = []
    for s in range(0, len(queries), chunk):
        idx = queries[s : s + chunk]
        scores = image_emb[idx] @ text_emb.T  # (Nc, M)
        correct = text_image[None, :] == idx[:, None]  # (Nc, M) the image's own captions
        i2t.append(ranks_from_scores(scores, correct))

    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(t2i) if t2i else empty), (torch.cat(i2t) if i2t else empty)


def metrics_from_ranks(
    t2i: torch.Tensor, i2t: torch.Tensor, ks: Iterable[int] = (1, 5, 10), n_images: int = 0, n_texts: int = 0
) -> dict[str, float]:
    """Image<->text retrieval metrics from the ranks of :func:`retrieval_ranks`: ``text_to_image_*``
    (find the image of a caption among all N images) and ``image_to_text_*`` (find any caption of an
    image among all M captions); a flat dict of floats: ``*_R@k`` (recall@k) for each k,
    ``*_rank_{mean,median,q1,q3}`` (1-based, pessimistic ties), ``n_images``, ``n_texts``."""
    if len(t2i) == 0:
        raise ValueError("retrieval metrics need at least one caption")
    out: dict[str, float] = {}
    for name, ranks in (("text_to_image", t2i), ("image_to_text", i2t)):
        for k, v in accuracy_at_k(ranks, tuple(ks)).items():
            out[f"{name}_R@{k}"] = v
        for stat, v in rank_stats(ranks).items():
            out[f"{name}_rank_{stat}"] = v
    out["n_images"] = int(n_images)
    out["n_texts"] = int(n_texts)
    return out
