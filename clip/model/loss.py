"""Symmetric InfoNCE over the global batch, with parallel captions and multiple crops.

CLIP's loss (Radford et al. 2021) extended as in Parallel Multilingual CLIP: each image has C
caption slots (one per language; invalid slots are masked), and as in KELIP's multi-crop each
image comes as V crops, each contrasted with the batch's captions; the crop losses are averaged.

For crop v, with N = world_size * B images and the valid captions of all ranks as columns:

* image -> text: soft-target cross-entropy of each image over ALL valid captions, the target
  uniform over that image's own valid captions; averaged over images with >= 1 caption.
* text -> image: cross-entropy of each valid caption over all N images, target its image;
  averaged over valid captions.
* loss_v = (i2t + t2i) / 2; loss = mean_v loss_v.

With V = C = 1 this is exactly (CE(L, arange) + CE(L^T, arange)) / 2.

Distributed: features are gathered with gradient (``_AllGatherWithGrad``, an all_gather whose
backward sums every rank's gradient for its slice, on NCCL and on gloo). Each rank computes
the rows of ITS images / captions against all columns and normalises by the GLOBAL counts
times ``world_size``. So the per-rank value is world_size x its
share, the mean of the per-rank values is the 1-process loss, and after DeepSpeed/DDP average
the gradients over ranks they equal the 1-process gradients for the same global batch.
The trainer logs the mean of the per-rank values over ranks, which is the 1-process loss.

Memory: the logits of this rank's rows against all columns are V x B x N x C numbers, which grow
with the local batch times the global batch (with cached accumulation, B is the whole local batch
of k micro-batches: 4,096 local rows against 32,768 images x 2 captions x 6 crops is 6 GiB per
copy). With ``max_block`` set, the rows are taken in chunks of at most ``max_block`` logits each
(``_ChunkedRowTerms``): only the features are kept for backward, each chunk's logits are
recomputed there one chunk at a time, and the loss is the same sum in another order (the
collectives run once, outside the chunks).

Legend: V crops, B local batch, N global batch, C caption slots, E width.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Output (W, ...) = every rank's ``x``; backward: :func:`reduce_to_owners`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.world_size = rank, world_size
        return torch.stack(parts)  # (W, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_to_owners(grad, ctx.rank, ctx.world_size), None, None


def reduce_to_owners(grads: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """grads (W, ...), each rank's contribution for every rank's slice -> the sum over ranks of the
    contributions for this rank's slice (...): reduce-scatter (NCCL) or all-reduce then take our
    slice (gloo, which has no reduce-scatter)."""
    if world_size == 1:
        return grads[0]
    grads = grads.contiguous()
    if dist.get_backend() == "nccl":
        out = torch.empty_like(grads[0])
        dist.reduce_scatter_tensor(out, grads)
        return out
    dist.all_reduce(grads)
    return grads[rank]


def gather(x: torch.Tensor, rank: int, world_size: int, dim: int, grad: bool = True) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim``. With ``grad`` (and ``x`` needing it) the
    gradient of every rank's use of this slice flows back to it; else only this rank's own use does."""
    if world_size == 1:
        return x
    if grad and x.requires_grad:
        parts = list(_AllGatherWithGrad.apply(x, rank, world_size).unbind(0))
    else:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x  # keep the local gradient path
    return torch.cat(parts, dim=dim)


def check_features(image_features: torch.Tensor, text_features: torch.Tensor,
                   text_mask: torch.Tensor) -> tuple[int, int, int]:
    """``(V, B, C)`` of a contrastive loss's inputs (image (V, B, E), text (B, C, E), mask (B, C)),
    or one ValueError naming the shapes that do not fit."""
    if image_features.ndim != 3 or text_features.ndim != 3:
        raise ValueError(f"expected image (V, B, E) and text (B, C, E) features, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    V, B, E = image_features.shape
    if text_features.shape[0] != B or text_features.shape[2] != E or text_mask.shape != text_features.shape[:2]:
        raise ValueError(f"batch mismatch: image {tuple(image_features.shape)}, text "
                         f"{tuple(text_features.shape)}, mask {tuple(text_mask.shape)}")
    return V, B, text_features.shape[1]


def chance_level(images: int, slots: int) -> float:
    """The loss of uniform logits over a contrastive batch of ``images`` images with ``slots``
    caption slots each: image -> text ln(images x slots) (its slots among all of them), text ->
    image ln(images). A model stuck there has collapsed (the divergence guard's test)."""
    return 0.5 * (math.log(images * slots) + math.log(images))


class ClipLoss(nn.Module):
    """Contrastive loss of the CLIP stage.

    Args:
        rank, world_size: this process and the number of data-parallel processes.
        gather_with_grad: gather other ranks' features with autograd (required for the exact
            1-process equivalence of gradients). If False, other ranks' features are constants
            and only this rank's own features receive gradient (cheaper; open_clip's default).
        max_block: the most logits computed at once (elements, per direction); this rank's rows
            are chunked to stay under it (see the module docstring). 0: all rows at once.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True, max_block: int = 0):
        super().__init__()
        if max_block < 0:
            raise ValueError(f"max_block must be >= 0, got {max_block}")
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad
        self.max_block = max_block

    def rows_per_chunk(self, V: int, B: int, N: int, C: int) -> int:
        """How many of this rank's B rows go into one chunk (B: no chunking)."""
        return B if not self.max_block else max(1, min(B, self.max_block // max(1, V * N * C)))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                text_mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_features (V, B, E), text_features (B, C, E), text_mask (B, C) bool,
        logit_scale = exp'd temperature (scalar tensor). Features are expected L2-normalised; half
        precision inputs are computed in fp32. Every rank must pass the same V, B and C."""
        V, B, C = check_features(image_features, text_features, text_mask)
        # at least fp32: the logsumexp over the whole batch is not safe in half precision
        image_features, text_features, logit_scale = (
            t.to(torch.promote_types(t.dtype, torch.float32)) for t in (image_features, text_features, logit_scale))
        mask = text_mask.to(torch.bool)
        all_images = gather(image_features, self.rank, self.world_size, 1, self.gather_with_grad)  # (V, N, E)
        all_texts = gather(text_features, self.rank, self.world_size, 0, self.gather_with_grad)  # (N, C, E)
        all_mask = gather(mask.to(torch.uint8), self.rank, self.world_size, 0).to(torch.bool)  # (N, C)
        N = all_texts.shape[0]
        offset = self.rank * B
        columns = (all_images, all_texts, all_mask, logit_scale)

        rows = self.rows_per_chunk(V, B, N, C)
        if rows >= B:
            i2t, t2i = _row_terms(image_features, text_features, mask, *columns, offset)
        else:
            i2t, t2i = _ChunkedRowTerms.apply(rows, image_features, text_features, mask, *columns, offset)
        n_img_global = (all_mask.sum(dim=1) > 0).sum().clamp(min=1)
        n_txt_global = all_mask.sum().clamp(min=1)
        w = self.world_size
        loss_v = (i2t * w / n_img_global + t2i * w / n_txt_global) / 2  # (V,)
        return loss_v.mean()


class _ChunkedRowTerms(torch.autograd.Function):
    """:func:`_row_terms` over row chunks of ``rows``: the forward keeps no chunk's logits, the
    backward recomputes each chunk and takes its gradients before the next (activation
    checkpointing by hand; ``torch.utils.checkpoint`` left reference cycles that kept the process
    group alive past ``destroy_process_group``)."""

    @staticmethod
    def forward(ctx, rows: int, image_features, text_features, mask, all_images, all_texts, all_mask,
                logit_scale, offset: int):
        i2t = t2i = 0.0
        for r in range(0, text_features.shape[0], rows):
            a, b = _row_terms(image_features[:, r:r + rows], text_features[r:r + rows], mask[r:r + rows],
                              all_images, all_texts, all_mask, logit_scale, offset + r)
            i2t, t2i = i2t + a, t2i + b
        ctx.save_for_backward(image_features, text_features, mask, all_images, all_texts, all_mask, logit_scale)
        ctx.rows, ctx.offset = rows, offset
        return i2t, t2i

    @staticmethod
    def backward(ctx, g_i2t, g_t2i):
        image_features, text_features, mask, all_images, all_texts, all_mask, logit_scale = ctx.saved_tensors
        cols = [t.detach().requires_grad_() for t in (all_images, all_texts, logit_scale)]
        g_img, g_txt = torch.zeros_like(image_features), torch.zeros_like(text_features)
        g_cols = [torch.zeros_like(t) for t in cols]
        rows = ctx.rows
        for r in range(0, text_features.shape[0], rows):
            img = image_features[:, r:r + rows].detach().requires_grad_()
            txt = text_features[r:r + rows].detach().requires_grad_()
            with torch.enable_grad():
                a, b = _row_terms(img, txt, mask[r:r + rows], cols[0], cols[1], all_mask, cols[2], ctx.offset + r)
                grads = torch.autograd.grad((a, b), (img, txt, *cols), (g_i2t, g_t2i))
            g_img[:, r:r + rows], g_txt[r:r + rows] = grads[0], grads[1]
            for acc, g in zip(g_cols, grads[2:]):
                acc += g
        return None, g_img, g_txt, None, g_cols[0], g_cols[1], None, g_cols[2], None


def _row_terms(image_rows: torch.Tensor, text_rows: torch.Tensor, mask: torch.Tensor, all_images: torch.Tensor,
               all_texts: torch.Tensor, all_mask: torch.Tensor, logit_scale: torch.Tensor,
               offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over b local rows (global rows offset .. offset + b - 1) of the image -> text and the
    text -> image cross-entropies, per crop: ((V,), (V,)). image_rows (V, b, E), text_rows (b, C, E),
    mask (b, C); the columns are every rank's: all_images (V, N, E), all_texts (N, C, E)."""
    V, B, _ = image_rows.shape
    N, C, _ = all_texts.shape
    # image -> text: local images (rows) against every global caption slot (columns)
    logits = logit_scale * torch.einsum("vbe,nce->vbnc", image_rows, all_texts)
    logits = logits.reshape(V, B, N * C)  # (V, B, N*C)
    logits = logits.masked_fill(~all_mask.reshape(1, 1, N * C), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # (V, B)
    rows = torch.arange(B, device=logits.device)
    own = logits.reshape(V, B, N, C)[:, rows, offset + rows]  # (V, B, C): its own captions
    n_caps = mask.sum(dim=1)  # (B,)
    own_mean = torch.where(mask, own, 0.0).sum(-1) / n_caps.clamp(min=1)  # (V, B)
    i2t = torch.where(n_caps > 0, lse - own_mean, 0.0).sum(-1)  # (V,)

    # text -> image: local caption slots (rows) against every global image (columns); the
    # masked slots are computed too and weighted 0 (no boolean indexing: no host sync)
    logits_t = logit_scale * torch.einsum("bce,vne->vbcn", text_rows, all_images)
    target = (offset + rows).view(1, B, 1, 1).expand(V, B, C, 1)  # each caption's image
    pos = logits_t.gather(-1, target).squeeze(-1)  # (V, B, C)
    ce = torch.logsumexp(logits_t, dim=-1) - pos  # (V, B, C)
    t2i = torch.where(mask, ce, 0.0).sum(dim=(1, 2))  # (V,)
    return i2t, t2i
