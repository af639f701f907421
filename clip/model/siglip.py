"""Sigmoid loss over the global batch, with parallel captions and multiple crops.

SigLIP's loss (Zhai et al. 2023): every (image, caption) pair is its own binary term on the logit
z = logit_scale * cos + logit_bias, positive for the image's own captions and negative for every
other caption of the global batch. As for :mod:`clip.model.loss`, each image has C caption slots
(one per language; masked slots contribute nothing) and V crops: every valid caption slot of an
image is a positive of each of its crops (all translations, as Parallel Multilingual CLIP), and
the crop losses are averaged. An image without a valid caption is still the negative of every
caption.

Normalisation: the sum of -log sigmoid(+-z) over all (crop, image, valid caption) pairs, divided
by V times the number of valid captions in the global batch. With C = 1 and no masked slot this is
big_vision's and open_clip's value (the sum over pairs over the number of images); with two
languages it is the same per caption, and its level at constant logits depends on the number of
images only (:func:`constant_logit_loss`). As for ``ClipLoss``, each rank returns world_size x its
share, so the mean over ranks is the 1-process loss and the ranks' gradients, averaged by
DeepSpeed, are the 1-process gradients.

Computation: -log sigmoid(-z) = softplus(z) and -log sigmoid(z) = softplus(z) - z, so the loss is
the softplus of every valid pair's logit (``_PairTerms``, the only part that needs other ranks'
captions) minus the logits of the positive pairs (local: each image's own captions), divided as
above. No rank ever holds the global logits or the other ranks' images:

* the captions travel (``exchange``): ``"shift"`` passes them around the ring, one hop per rank,
  each hop overlapping the computation on the captions already there (open_clip's ``shift``);
  ``"bidir"`` sends them both ways round, half as many hops (open_clip's ``bidir``); ``"gather"``
  is one all_gather. The number of valid captions travels with them.
* each rank's images meet one rank's B x C captions at a time, in row chunks of at most
  ``max_block`` logits. The gradients of the sum are taken right there, while the chunk is in
  memory (the sum is linear in the upstream gradient, so backward only scales them): no logits are
  kept and none is recomputed. The gradient for each rank's captions is kept per owner, then
  backward scales it by this rank's upstream gradient and reduce-scatters it to its owner (NCCL
  reduce_scatter; all_reduce on gloo, which has no reduce-scatter).

Memory: about two chunks of logits at a time (the logits and their softplus), plus the
gradients of every rank's captions (N x C x E, as many numbers as gathered captions).

Legend: V crops, B local batch, N global batch (world_size x B), C caption slots, E width,
W world size, r rows of a chunk.
"""
from __future__ import annotations

import math
from typing import Iterator, Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clip.model.loss import check_features, reduce_to_owners

Exchange = Literal["shift", "bidir", "gather"]


def constant_logit_loss(images: int, logit: float) -> float:
    """The loss when every logit equals ``logit`` (e.g. ``logit_bias`` with cos = 0), over a
    global batch of ``images`` images: each valid caption is one positive pair and images - 1
    negative ones, whatever the caption slots, masks and crops, so the loss is
    softplus(-logit) + (images - 1) softplus(logit)."""
    def softplus(x: float) -> float:
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
    return softplus(-logit) + (images - 1) * softplus(logit)


def chance_level(images: int) -> float:
    """The lowest loss of a model whose logits do not tell pairs apart (a collapsed model that has
    learned the bias): :func:`constant_logit_loss` at its minimum, logit = -ln(images - 1), which is
    ln(images) + (images - 1) ln(images / (images - 1)), about ln(images) + 1. The divergence
    guard's "collapsed" level; the loss at initialisation (bias -10) is above it."""
    if images < 2:
        return 0.0
    return math.log(images) + (images - 1) * math.log1p(1 / (images - 1))


class SigLipLoss(nn.Module):
    """Sigmoid loss of the CLIP stage (see the module docstring).

    Args:
        rank, world_size: this process and the number of data-parallel processes (ranks of the
            default process group). Every rank must call the loss, and its backward, together.
        max_block: the most logits computed at once (elements); this rank's rows are chunked
            against each rank's captions to stay under it. 0: all B rows against one rank's
            captions at once.
        exchange: how the captions reach the other ranks: ``"shift"`` (ring), ``"bidir"`` (both
            ways round) or ``"gather"`` (one all_gather; no overlap with the computation).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, max_block: int = 0, exchange: Exchange = "shift"):
        super().__init__()
        if max_block < 0:
            raise ValueError(f"max_block must be >= 0, got {max_block}")
        if exchange not in get_args(Exchange):
            raise ValueError(f"exchange must be one of {get_args(Exchange)}, got {exchange!r}")
        self.rank, self.world_size, self.max_block, self.exchange = rank, world_size, max_block, exchange

    def rows_per_chunk(self, V: int, B: int, C: int) -> int:
        """How many of this rank's B rows meet one rank's B x C captions at once (B: no chunking)."""
        return B if not self.max_block else max(1, min(B, self.max_block // max(1, V * B * C)))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, text_mask: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        """image_features (V, B, E), text_features (B, C, E), text_mask (B, C) bool, logit_scale =
        exp'd temperature and logit_bias (one-element tensors). Features are expected
        L2-normalised; half precision inputs are computed in fp32. Every rank must pass the same
        V, B and C. With grad enabled the forward also does the backward's computation (see the
        module docstring): evaluate under ``torch.no_grad()``."""
        V, _, _ = check_features(image_features, text_features, text_mask)
        if logit_scale.numel() != 1 or logit_bias.numel() != 1:
            raise ValueError(f"logit_scale and logit_bias must have one element, got shapes "
                             f"{tuple(logit_scale.shape)} and {tuple(logit_bias.shape)}")
        img, txt, scale, bias = (t.to(torch.promote_types(t.dtype, torch.float32))
                                 for t in (image_features, text_features, logit_scale, logit_bias))
        scale, bias = scale.reshape(()), bias.reshape(())
        mask = text_mask.to(torch.bool)
        # masked slots as zeros, so that whatever they hold (NaN included) adds nothing
        txt = torch.where(mask[..., None], txt, 0.0)  # (B, C, E)
        want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (img, txt, scale, bias))
        negatives, n_captions = _PairTerms.apply(self, want_grad, img.contiguous(), txt.contiguous(), mask,
                                                 scale, bias)
        # -log sigmoid(z) = softplus(z) - z for the positive pairs: each image with its own captions
        own = scale * torch.einsum("vbe,bce->vbc", img, txt) + bias  # (V, B, C)
        positives = torch.where(mask, own, 0.0).sum()
        return (negatives - positives) * self.world_size / (V * n_captions.clamp(min=1))


class _PairTerms(torch.autograd.Function):
    """The sum of softplus(z) over every crop of this rank's images against every valid caption of
    every rank, and the number of valid captions in the global batch (no gradient). The gradients
    are computed in forward chunk by chunk (see the module docstring); backward scales them."""

    @staticmethod
    def forward(ctx, loss: SigLipLoss, want_grad: bool, img, txt, mask, scale, bias):
        V, B, E = img.shape
        C, W = txt.shape[1], loss.world_size
        rows = loss.rows_per_chunk(V, B, C)
        total = img.new_zeros(())
        n_captions = img.new_zeros(())
        if want_grad:
            g_img, g_scale, g_bias = torch.zeros_like(img), img.new_zeros(()), img.new_zeros(())
            g_txt = img.new_zeros(W, B, C, E)  # the gradient for each owner's captions
        for owner, t, m in _caption_blocks(loss.exchange, txt, mask, loss.rank, W):
            n_captions += m.sum()
            t = t.reshape(B * C, E)
            # a masked column gets logit -inf: softplus and sigmoid 0, no mask pass over the logits
            col_bias = torch.where(m.reshape(B * C), bias, float("-inf"))  # (B*C,)
            for r in range(0, B, rows):
                x = img[:, r:r + rows].reshape(-1, E)  # (V*r, E)
                z = torch.addmm(col_bias, x * scale, t.T)  # (V*r, B*C)
                total += F.softplus(z).sum()
                if not want_grad:
                    continue
                g = z.sigmoid_()  # d softplus(z) / dz, (V*r, B*C)
                g_bias += g.sum()
                gt = g @ t  # (V*r, E)
                g_scale += torch.dot(gt.reshape(-1), x.reshape(-1))
                g_img[:, r:r + rows] += (scale * gt).view(V, -1, E)
                g_txt[owner] += (scale * (g.T @ x)).view(B, C, E)
                del z, g, gt
        if want_grad:
            ctx.save_for_backward(g_img, g_txt, g_scale, g_bias)
        ctx.rank, ctx.world_size = loss.rank, W
        ctx.mark_non_differentiable(n_captions)
        return total, n_captions

    @staticmethod
    def backward(ctx, grad_total, _grad_count):
        g_img, g_txt, g_scale, g_bias = ctx.saved_tensors
        # scaled by THIS rank's upstream gradient before the owners sum them
        g_txt = reduce_to_owners(g_txt * grad_total, ctx.rank, ctx.world_size)
        return None, None, g_img * grad_total, g_txt, None, g_scale * grad_total, g_bias * grad_total


def _caption_blocks(exchange: Exchange, txt: torch.Tensor, mask: torch.Tensor, rank: int,
                    world_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Every rank's captions once, as ``(owner, text (B, C, E), mask (B, C))``, this rank's first.
    For ``shift`` and ``bidir`` each hop is posted before the blocks already here are yielded, so
    the transfer overlaps their computation."""
    here = [(rank, txt, mask)]
    if world_size == 1:
        yield from here
        return
    mask = mask.to(torch.uint8)  # bool is not a type every backend sends
    if exchange == "gather":
        texts = [torch.empty_like(txt) for _ in range(world_size)]
        masks = [torch.empty_like(mask) for _ in range(world_size)]
        dist.all_gather(texts, txt)
        dist.all_gather(masks, mask)
        yield from here
        for owner in range(world_size):
            if owner != rank:
                yield owner, texts[owner], masks[owner].to(torch.bool)
        return
    # each hop moves the newest block one rank on in each of its directions d (+1: to the right)
    both, one = divmod(world_size - 1, 2)
    hops = [(1,)] * (world_size - 1) if exchange == "shift" else [(1, -1)] * both + [(1,)] * one
    newest = {1: (txt, mask), -1: (txt, mask)}
    for h, directions in enumerate(hops):
        ops, received = [], {}
        for d in directions:
            t, m = newest[d]
            received[d] = torch.empty_like(t), torch.empty_like(m)
            tag = 0 if d == 1 else 2  # text tag, mask tag + 1: they tell the directions apart on gloo
            ops += [dist.P2POp(dist.isend, t, (rank + d) % world_size, tag=tag),
                    dist.P2POp(dist.isend, m, (rank + d) % world_size, tag=tag + 1),
                    dist.P2POp(dist.irecv, received[d][0], (rank - d) % world_size, tag=tag),
                    dist.P2POp(dist.irecv, received[d][1], (rank - d) % world_size, tag=tag + 1)]
        works = dist.batch_isend_irecv(ops)
        yield from here
        for w in works:
            w.wait()
        here = [((rank - d * (h + 1)) % world_size, t, m.to(torch.bool)) for d, (t, m) in received.items()]
        newest.update(received)
    yield from here
