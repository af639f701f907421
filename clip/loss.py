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

Legend: V crops, B local batch, N global batch, C caption slots, E width.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Output (W, ...) = every rank's ``x``. Backward: reduce-scatter (NCCL) or all-reduce then
    take our slice (gloo, which has no reduce-scatter).
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
        grad = grad.contiguous()  # (W, ...)
        if dist.get_backend() == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad)
        else:
            dist.all_reduce(grad)
            out = grad[ctx.rank]
        return out, None, None


class ClipLoss(nn.Module):
    """Contrastive loss of the CLIP stage.

    Args:
        rank, world_size: this process and the number of data-parallel processes.
        gather_with_grad: gather other ranks' features with autograd (required for the exact
            1-process equivalence of gradients). If False, other ranks' features are constants
            and only this rank's own features receive gradient (cheaper; open_clip's default).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def _gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if self.gather_with_grad and x.requires_grad:
            parts = list(_AllGatherWithGrad.apply(x, self.rank, self.world_size).unbind(0))
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x.detach().contiguous())
            parts[self.rank] = x  # keep the local gradient path
        return torch.cat(parts, dim=dim)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                text_mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """image_features (V, B, E), text_features (B, C, E), text_mask (B, C) bool,
        logit_scale = exp'd temperature (scalar tensor). Features are expected L2-normalised; half
        precision inputs are computed in fp32. Every rank must pass the same V, B and C."""
        if image_features.ndim != 3 or text_features.ndim != 3:
            raise ValueError(f"expected image (V, B, E) and text (B, C, E) features, got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        V, B, E = image_features.shape
        if text_features.shape[0] != B or text_mask.shape != text_features.shape[:2]:
            raise ValueError(f"batch mismatch: image {tuple(image_features.shape)}, text "
                             f"{tuple(text_features.shape)}, mask {tuple(text_mask.shape)}")
        C = text_features.shape[1]
        # at least fp32: the logsumexp over the whole batch is not safe in half precision
        image_features, text_features, logit_scale = (
            t.to(torch.promote_types(t.dtype, torch.float32)) for t in (image_features, text_features, logit_scale))
        mask = text_mask.to(torch.bool)
        all_images = self._gather(image_features, dim=1)  # (V, N, E)
        all_texts = self._gather(text_features, dim=0)  # (N, C, E)
        all_mask = self._gather(mask.to(torch.uint8), dim=0).to(torch.bool)  # (N, C)
        N = all_texts.shape[0]
        offset = self.rank * B

        # image -> text: local images (rows) against every global caption slot (columns)
        logits = logit_scale * torch.einsum("vbe,nce->vbnc", image_features, all_texts)
        logits = logits.reshape(V, B, N * C)  # (V, B, N*C)
        logits = logits.masked_fill(~all_mask.reshape(1, 1, N * C), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # (V, B)
        rows = torch.arange(B, device=logits.device)
        own = logits.reshape(V, B, N, C)[:, rows, offset + rows]  # (V, B, C): its own captions
        n_caps = mask.sum(dim=1)  # (B,)
        has_cap = n_caps > 0
        own_mean = torch.where(mask, own, 0.0).sum(-1) / n_caps.clamp(min=1)  # (V, B)
        i2t = torch.where(has_cap, lse - own_mean, 0.0).sum(-1)  # (V,)
        n_img_global = (all_mask.sum(dim=1) > 0).sum().clamp(min=1)

        # text -> image: local caption slots (rows) against every global image (columns); the
        # masked slots are computed too and weighted 0 (no boolean indexing: no host sync)
        logits_t = logit_scale * torch.einsum("bce,vne->vbcn", text_features, all_images)
        target = (offset + rows).view(1, B, 1, 1).expand(V, B, C, 1)  # each caption's image
        pos = logits_t.gather(-1, target).squeeze(-1)  # (V, B, C)
        ce = torch.logsumexp(logits_t, dim=-1) - pos  # (V, B, C)
        t2i = torch.where(mask, ce, 0.0).sum(dim=(1, 2))  # (V,)
        n_txt_global = all_mask.sum().clamp(min=1)

        w = self.world_size
        loss_v = (i2t * w / n_img_global + t2i * w / n_txt_global) / 2  # (V,)
        return loss_v.mean()
