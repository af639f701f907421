"""Feature-cached accumulation: a contrastive batch of every micro-batch of every rank, at the
memory of one micro-batch (GradCache, Gao et al. 2021; open_clip's ``--accum-freq``).

With ``train.grad_accum = k``, one optimizer step is:

1. each of the k micro-batches through both towers without a graph, keeping only the features
   (and the random state each forward started from); the last micro-batch is run WITH its graph;
2. the contrastive loss over all k micro-batches of all ranks (``ClipLoss`` gathers across ranks
   with gradient, ``SigLipLoss`` passes the captions round) and its gradient with respect to those
   features, the temperature and, when the model has a ``logit_bias`` (SigLIP), the bias;
3. ``engine.backward`` of ``<features, cached feature gradient>`` (plus the temperature and bias
   terms once)
   through the last micro-batch's kept graph, then each other micro-batch through the towers again,
   with a graph and the same random draws (patch dropout), and its own backward. This puts exactly
   the full-batch loss's gradient in the parameters.

DeepSpeed accumulates the k backwards and steps at the boundary as usual (``scale_wrt_gas=False``:
the cached gradients are already those of the whole batch's loss). A step costs k - 1 more
forwards than plain accumulation, in exchange for the full set of negatives. Keeping the last
micro-batch's graph saves its second forward at no cost in peak memory: that graph is freed by
its backward before any other micro-batch builds one.

Legend: V crops, B micro-batch, k micro-batches, C caption slots, E width.
"""
from __future__ import annotations

import contextlib

import torch

from clip.model.distill import TeacherTargets
from clip.model.loss import ClipLoss
from clip.model.siglip import SigLipLoss
from launch.runtime.dist import rng_state, set_rng_state


class CachedContrastiveStep:
    """One optimizer step of the CLIP stage over k micro-batches (see the module docstring).

    Args:
        engine: the engine (:class:`launch.runtime.engine.Engine`, or anything with the same
            ``__call__``, ``backward(loss, scale_wrt_gas=...)``, ``step()`` and ``module``) around a
            ``clip.model.CLIP``; its forward applies the run's precision.
        loss_fn: the contrastive loss, given this rank's place: ``ClipLoss``, or ``SigLipLoss`` for a
            model with a ``logit_bias`` (passed to it as the fifth argument).
        distill: a :class:`clip.model.distill.DistillTerm` added to the loss over the whole batch
            (the teacher's targets taken per micro-batch in the first pass; it draws nothing).
    """

    def __init__(self, engine, loss_fn: ClipLoss | SigLipLoss, distill=None):
        self.engine, self.loss_fn, self.distill = engine, loss_fn, distill

    def __call__(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and ``engine.step()`` for every micro-batch of ``batches``; returns the
        whole batch's loss (detached) and the logit scale."""
        engine = self.engine
        starts, images, texts = [], [], []
        targets = []
        for i, b in enumerate(batches):
            starts.append(rng_state())
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else torch.no_grad():
                img, txt, scale_k = engine(b["images"], b["tokens"], b["text_mask"])  # (V, B, E), (B, C, E)
            images.append(img.detach())
            texts.append(txt.detach())
            if self.distill is not None:
                targets.append(self.distill.targets(b["images"], b["captions"], b["text_mask"], b["slot_languages"]))
        kept = img, txt, scale_k  # the last micro-batch's outputs, with their graph
        after = rng_state()
        img = torch.cat(images, dim=1).requires_grad_()  # (V, kB, E)
        txt = torch.cat(texts, dim=0).requires_grad_()  # (kB, C, E)
        mask = torch.cat([b["text_mask"] for b in batches])  # (kB, C)
        scale = engine.module.scale().detach().requires_grad_()
        bias = getattr(engine.module, "logit_bias", None)  # SigLIP's learnable bias, (1,)
        extra = [] if bias is None else [bias.detach().requires_grad_()]
        loss = self.loss_fn(img, txt, mask, scale, *extra)
        if self.distill is not None:
            loss = loss + self.distill(img, txt, scale, TeacherTargets.cat(targets))
        g_img, g_txt, g_scale, *g_extra = torch.autograd.grad(loss, [img, txt, scale, *extra])
        sizes = [t.shape[0] for t in texts]
        g_imgs, g_txts = g_img.split(sizes, dim=1), g_txt.split(sizes, dim=0)
        # the kept graph first (it is freed by its backward), then every other micro-batch again
        for i in [len(batches) - 1, *range(len(batches) - 1)]:
            if i == len(batches) - 1:
                img_i, txt_i, scale_i = kept
            else:
                b = batches[i]
                set_rng_state(starts[i])  # the same patch-dropout draws as the cached forward
                img_i, txt_i, scale_i = engine(b["images"], b["tokens"], b["text_mask"])
            surrogate = (img_i.float() * g_imgs[i]).sum() + (txt_i.float() * g_txts[i]).sum()
            if i == len(batches) - 1:
                surrogate = surrogate + (scale_i.float() * g_scale).sum()
                if g_extra:
                    surrogate = surrogate + (bias.float() * g_extra[0]).sum()
            engine.backward(surrogate, scale_wrt_gas=False)
            engine.step()
        del kept, img_i, txt_i, scale_i
        set_rng_state(after)
        return loss.detach(), scale.detach()
