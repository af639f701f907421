"""Feature-cached accumulation: a contrastive batch of every micro-batch of every rank, at the
memory of one micro-batch (GradCache, Gao et al. 2021; open_clip's ``--accum-freq``).

With ``train.grad_accum = k``, one optimizer step is:

1. each of the k micro-batches through both towers without a graph, keeping only the features
   (and the random state each forward started from);
2. the InfoNCE over all k micro-batches of all ranks (``ClipLoss`` gathers across ranks with
   gradient) and its gradient with respect to those features and the temperature;
3. each micro-batch through the towers again, with a graph and the same random draws (patch
   dropout), and ``engine.backward`` of ``<features, cached feature gradient>`` (plus the
   temperature term once), which puts exactly the full-batch loss's gradient in the parameters.

DeepSpeed accumulates the k backwards and steps at the boundary as usual (``scale_wrt_gas=False``:
the cached gradients are already those of the whole batch's loss). The forward runs twice, so a
step costs one more forward of each micro-batch than plain accumulation, in exchange for the full
set of negatives.

Legend: V crops, B micro-batch, k micro-batches, C caption slots, E width.
"""
from __future__ import annotations

import contextlib

import torch

from clip.loss import ClipLoss
from launch.dist import rng_state, set_rng_state


class CachedContrastiveStep:
    """One optimizer step of the CLIP stage over k micro-batches (see the module docstring).

    Args:
        engine: the DeepSpeed engine (or anything with the same ``__call__``, ``backward(loss,
            scale_wrt_gas=...)``, ``step()`` and ``module``) around a ``clip.model.CLIP``.
        loss_fn: the contrastive loss, given this rank's place.
        autocast: a context factory the forwards run in (``launch.optim.autocast``).
    """

    def __init__(self, engine, loss_fn: ClipLoss, autocast=contextlib.nullcontext):
        self.engine, self.loss_fn, self.autocast = engine, loss_fn, autocast

    def __call__(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and ``engine.step()`` for every micro-batch of ``batches``; returns the
        whole batch's loss (detached) and the logit scale."""
        engine = self.engine
        starts, images, texts = [], [], []
        with torch.no_grad(), self.autocast():
            for b in batches:
                starts.append(rng_state())
                img, txt, _ = engine(b["images"], b["tokens"], b["text_mask"])  # (V, B, E), (B, C, E)
                images.append(img)
                texts.append(txt)
        after = rng_state()
        img = torch.cat(images, dim=1).detach().requires_grad_()  # (V, kB, E)
        txt = torch.cat(texts, dim=0).detach().requires_grad_()  # (kB, C, E)
        mask = torch.cat([b["text_mask"] for b in batches])  # (kB, C)
        scale = engine.module.scale().detach().requires_grad_()
        loss = self.loss_fn(img, txt, mask, scale)
        g_img, g_txt, g_scale = torch.autograd.grad(loss, [img, txt, scale])
        sizes = [t.shape[0] for t in texts]
        for i, (b, gi, gt) in enumerate(zip(batches, g_img.split(sizes, dim=1), g_txt.split(sizes, dim=0))):
            set_rng_state(starts[i])  # the same patch-dropout draws as the cached forward
            with self.autocast():
                img_i, txt_i, scale_i = engine(b["images"], b["tokens"], b["text_mask"])
            surrogate = (img_i.float() * gi).sum() + (txt_i.float() * gt).sum()
            if i == 0:
                surrogate = surrogate + (scale_i.float() * g_scale).sum()
            engine.backward(surrogate, scale_wrt_gas=False)
            engine.step()
        set_rng_state(after)
        return loss.detach(), scale.detach()
