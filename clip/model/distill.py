"""Distillation from a frozen teacher CLIP: the text-only student and its distance (M-CLIP), and the
image-text term (open_clip's ``DistillClipLoss``).

**Text only** (Carlsson et al. 2022, M-CLIP; Bingsu/clip-vit-base-patch32-ko): a student text tower
and a linear projection into the teacher's embedding space (:class:`TextStudent`) are trained so that
the student's embedding of a sentence in any language equals the teacher text tower's embedding of
its English original; :func:`text_distance` per sentence: ``mse`` = squared Euclidean distance
between the student's projection (unnormalised) and the teacher's unit vector (2 - 2 cos for a unit
student vector; torch's ``mse_loss`` times E), or ``cosine`` = 1 - cos. The teacher's image tower,
unchanged, and the student make a whole CLIP (:func:`assemble_clip`).

**Image-text** (:class:`DistillLoss`): besides the contrastive loss, the student's image -> text and
text -> image distributions over the global batch are pulled toward the teacher's:
KL(p_teacher || p_student) per row, where p = softmax(scale x cosines). open_clip's
``DistillClipLoss`` takes the cross-entropy with the teacher's soft targets instead: it exceeds the
KL by the teacher's entropy, a constant, so the gradients are the same; the KL is 0 when the student
matches. How the batch maps onto the teacher: the teacher sees each image once (the first crop,
the first global crop of :mod:`clip.data.multicrop`, resized and re-normalised to its own input)
and each valid caption slot (its raw text, through its own tokenizer); every student crop v is
pulled toward that one image distribution. Rows: image -> text, every image of this rank against
every valid caption of the global batch (an image's distribution over captions exists whether or
not it has captions of its own); text -> image, every valid caption against every image. Each
direction is the mean KL over its global rows, the two are averaged, then the crops.

Distributed exactly as :class:`clip.model.loss.ClipLoss`: student features are gathered with
gradient, the teacher's without, each rank computes its own rows and normalises by the global row
counts times ``world_size``, so the mean over ranks is the 1-process loss and the rank-averaged
gradients are the 1-process gradients (tested with 2 gloo ranks). Memory: this rank's rows against
all columns in one block, V x B x N x C student logits and B x N x C teacher logits per direction
(no row chunks, unlike ``ClipLoss``'s ``max_block``).

Legend: V crops, B local batch, N global batch, C caption slots, E the student's joint width, Et the
teacher's (in the image-text term they may differ: the two models meet only through their logits).
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clip.model.clip import CLIP, CLIPConfig
from clip.model.loss import gather

# --------------------------------------------------------------------------- text only


class TextStudent(nn.Module):
    """A text tower and its projection into the teacher's embedding space.

    Args:
        text: the tower, tokens (N, T) -> (N, D) (``clip.model.text.TextTransformer`` or
            ``clip.model.hf_text.HFTextTower``); named ``text`` as in :class:`CLIP`.
        width: the tower's output width D.
        embed_dim: the teacher's width Et; ``project=False`` needs D == Et (checked by the caller).
        project: a bias-free linear map D -> Et (``text_proj``, CLIP's init), else the identity.
    """

    def __init__(self, text: nn.Module, width: int, embed_dim: int, project: bool = True):
        super().__init__()
        self.text = text
        self.text_proj = nn.Linear(width, embed_dim, bias=False) if project else nn.Identity()
        if project:
            nn.init.normal_(self.text_proj.weight, std=width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.set_grad_checkpointing(enable)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, T) -> (N, Et), unnormalised."""
        return self.text_proj(self.text(tokens))


def text_distance(student: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per row (N,): ``mse`` = ||student - target||^2, ``cosine`` = 1 - cos(student, target), in fp32;
    ``target`` (N, E) are the teacher's unit vectors, ``student`` (N, E) unnormalised."""
    s, t = student.float(), target.float()
    if kind == "mse":
        return (s - t).pow(2).sum(dim=-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    raise ValueError(f"distance must be mse or cosine, got {kind!r}")


def assemble_clip(teacher: CLIP, student: TextStudent, cfg: CLIPConfig) -> CLIP:
    """The distilled CLIP: the teacher's image tower, projection and temperature, the student's text
    tower and projection (the identity as a matrix where it had none), copied, on the CPU. ``cfg``:
    the teacher's config with the student's text tower (``text``, ``text_tower``, ``hf_text``)."""
    model = CLIP(cfg, text_tower=copy.deepcopy(student.text).cpu())
    with torch.no_grad():
        model.visual.load_state_dict(teacher.visual.state_dict())
        model.visual_proj.load_state_dict(teacher.visual_proj.state_dict())
        model.logit_scale.copy_(teacher.logit_scale)
        if isinstance(student.text_proj, nn.Linear):
            model.text_proj.weight.copy_(student.text_proj.weight)
        else:
            model.text_proj.weight.copy_(torch.eye(cfg.embed_dim))
    return model.eval()


# --------------------------------------------------------------------------- image-text


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last dim, columns where ``valid`` only (a
    row without any valid column gives 0: the fill is finite, and its differences are not summed)."""
    fill = -1e9  # exp underflows to exactly 0 beside any valid logit, in fp32 and fp64
    log_pt = teacher_logits.masked_fill(~valid, fill).log_softmax(dim=-1)
    log_ps = student_logits.masked_fill(~valid, fill).log_softmax(dim=-1)
    return (log_pt.exp() * torch.where(valid, log_pt - log_ps, 0.0)).sum(dim=-1)


class DistillLoss(nn.Module):
    """KL between the teacher's and the student's image -> text and text -> image distributions
    over the global batch (module docstring).

    Args:
        rank, world_size: this process and the number of data-parallel processes.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, text_mask: torch.Tensor,
                logit_scale: torch.Tensor, teacher_image: torch.Tensor, teacher_text: torch.Tensor,
                teacher_scale: torch.Tensor | float) -> torch.Tensor:
        """Student: image_features (V, B, E), text_features (B, C, E), text_mask (B, C), logit_scale
        (exp'd, scalar tensor); teacher: teacher_image (B, Et), teacher_text (B, C, Et) (masked slots
        any value), teacher_scale. Features L2-normalised; computed in at least fp32."""
        V, B, _ = image_features.shape
        C = text_features.shape[1]
        if text_features.shape[0] != B or text_mask.shape != (B, C) or teacher_image.shape[0] != B \
                or teacher_text.shape[:2] != (B, C):
            raise ValueError(f"batch mismatch: image {tuple(image_features.shape)}, text {tuple(text_features.shape)}, "
                             f"mask {tuple(text_mask.shape)}, teacher {tuple(teacher_image.shape)} and "
                             f"{tuple(teacher_text.shape)}")
        up = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731
        image_features, text_features, logit_scale = up(image_features), up(text_features), up(logit_scale)
        teacher_image, teacher_text = up(teacher_image.detach()), up(teacher_text.detach())
        t_scale = torch.as_tensor(teacher_scale, dtype=teacher_image.dtype, device=teacher_image.device)
        mask = text_mask.to(torch.bool)
        w, r = self.world_size, self.rank
        all_images = gather(image_features, r, w, 1)  # (V, N, E)
        all_texts = gather(text_features, r, w, 0)  # (N, C, E)
        all_mask = gather(mask.to(torch.uint8), r, w, 0, grad=False).to(torch.bool)  # (N, C)
        all_t_images = gather(teacher_image, r, w, 0, grad=False)  # (N, Et)
        all_t_texts = gather(teacher_text, r, w, 0, grad=False)  # (N, C, Et)
        N = all_texts.shape[0]

        # image -> text: this rank's images (rows) against every valid caption slot (columns)
        s = logit_scale * torch.einsum("vbe,nce->vbnc", image_features, all_texts).reshape(V, B, N * C)
        t = t_scale * torch.einsum("be,nce->bnc", teacher_image, all_t_texts).reshape(1, B, N * C)
        i2t = _kl_rows(t.expand(V, B, N * C), s, all_mask.reshape(1, 1, N * C)).sum(dim=1)  # (V,)

        # text -> image: this rank's caption slots (rows; masked ones weighted 0) against every image
        s = logit_scale * torch.einsum("bce,vne->vbcn", text_features, all_images)  # (V, B, C, N)
        t = t_scale * torch.einsum("bce,ne->bcn", teacher_text, all_t_images)  # (B, C, N)
        full = torch.ones(1, 1, 1, N, dtype=torch.bool, device=s.device)
        t2i = torch.where(mask, _kl_rows(t.expand(V, B, C, N), s, full), 0.0).sum(dim=(1, 2))  # (V,)

        n_txt = all_mask.sum().clamp(min=1)
        return ((i2t * w / N + t2i * w / n_txt) / 2).mean()


class TeacherTargets(NamedTuple):
    """The teacher's side of a batch: image (B, Et), caption slots (B, C, Et) (zero where not used)
    and ``mask`` (B, C): the slots the KL uses (valid, in a language the teacher reads)."""

    image: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def cat(parts: Sequence["TeacherTargets"]) -> "TeacherTargets":
        """Micro-batches concatenated along B, in order (feature-cached accumulation)."""
        return TeacherTargets(*(torch.cat([getattr(p, f) for p in parts]) for f in TeacherTargets._fields))


class DistillTerm:
    """The image-text distillation term of a CLIP step: ``weight x DistillLoss``.

    Args:
        teacher: frozen, with ``encode_image(images, mean, std)``, ``encode_text(list[str])`` (unit
            vectors) and ``logit_scale`` (exp'd): :class:`clip.interop.teacher.Teacher`.
        loss: the rank-aware :class:`DistillLoss`.
        weight: the term's weight beside the contrastive loss.
        image_mean, image_std: the normalisation of the student's finished crops.
        languages: the caption languages the teacher reads (None: all). Slots in other languages
            are left out of the KL, as if masked: an English teacher's distribution for a Korean
            caption is noise, and pulling the student toward it unlearns Korean.

    Use: ``targets = term.targets(crops, captions, text_mask, slot_languages)`` (no gradient; once
    per micro-batch), then ``term(image_features, text_features, scale, targets)``; :attr:`last`
    holds the unweighted KL of the last call (a tensor, for logging).
    """

    def __init__(self, teacher, loss: DistillLoss, weight: float, image_mean, image_std,
                 languages: Optional[Sequence[str]] = None):
        self.teacher, self.loss, self.weight = teacher, loss, float(weight)
        self.mean, self.std = tuple(image_mean), tuple(image_std)
        self.languages = None if languages is None else set(languages)
        self.teacher_scale = teacher.logit_scale  # a constant: read once, not synced every step
        self.last: Optional[torch.Tensor] = None

    @torch.no_grad()
    def targets(self, crops: Sequence[torch.Tensor] | torch.Tensor, captions: Sequence[Sequence[str]],
                text_mask: torch.Tensor, slot_languages: Optional[Sequence[Sequence[str]]] = None) -> TeacherTargets:
        """The teacher's side of a batch: its first crop (B, 3, H, W) and the raw caption of every
        slot it reads (``captions``, ``slot_languages``: B rows of C strings, as the batch holds
        them; anything where ``text_mask`` is False)."""
        first = crops[0] if isinstance(crops, (list, tuple)) else crops
        image = self.teacher.encode_image(first, self.mean, self.std)  # (B, Et)
        B, C = text_mask.shape
        texts = [str(c) for row in captions for c in row]
        if len(texts) != B * C:
            raise ValueError(f"captions: {len(texts)} strings for {B} x {C} caption slots")
        use = text_mask.reshape(-1).tolist()
        if self.languages is not None:
            if slot_languages is None:
                raise ValueError("this term reads only some languages: pass the batch's slot_languages")
            use = [u and lang in self.languages for u, lang in zip(use, (x for row in slot_languages for x in row))]
        enc = self.teacher.encode_text([t for t, u in zip(texts, use) if u])  # (n_used, Et)
        text = torch.zeros(B * C, image.shape[-1], device=image.device, dtype=image.dtype)
        mask = torch.tensor(use, dtype=torch.bool, device=image.device)
        if enc.numel():
            text[mask] = enc
        return TeacherTargets(image, text.reshape(B, C, -1), mask.reshape(B, C))

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 targets: TeacherTargets) -> torch.Tensor:
        dev = image_features.device
        kl = self.loss(image_features, text_features, targets.mask.to(dev), logit_scale, targets.image.to(dev),
                       targets.text.to(dev), self.teacher_scale)
        self.last = kl.detach()  # read when logged: no host sync between forward and backward
        return self.weight * kl
