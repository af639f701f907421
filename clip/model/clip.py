"""The CLIP model of stage 2: MAE-pretrained ViT image tower + GPT-2-style text tower.

CLIP (Radford et al. 2021) as adapted by KELIP (Ko & Gu 2022): both towers are projected by a
bias-free linear map to a joint ``embed_dim`` and L2-normalised; a learnable temperature
``logit_scale`` (log-parameterised, init log(1/0.07)) scales the cosine similarities. The image
tower is ``mae.vit.VisionTransformer``, so the MAE encoder export loads into ``visual`` by name
(:func:`clip.interop.init.load_image_tower`). Optional FLIP-style patch dropout (Li et al. 2023) drops a share of
the patch tokens in training only (timm's ``PatchDropout``; eval keeps all of them).

Legend: B batch, V crops per image, C caption slots per image, T tokens, E joint width,
Dv / Dt tower widths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import nn

from clip.model.hf_text import HFTextConfig, HFTextTower, tower_from_pretrained
from clip.model.text import TextConfig, TextTransformer
from mae.images.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from mae.vit import Pool, ViTConfig, VisionTransformer

TextTower = Literal["gpt2", "hf"]  # our GPT-2-style tower (clip.model.text) or a transformers encoder

@dataclass(frozen=True)
class CLIPConfig:
    """Both towers, the joint width and the temperature. ``patch_dropout`` is training-only."""

    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    # The training objective (clip.model.loss, clip.model.siglip): "infonce" (CLIP's softmax over the
    # batch) or "siglip" (a sigmoid per pair, with a learnable logit bias). It decides the
    # temperature's initial value when init_logit_scale is null: 1/0.07 (CLIP), 10 (SigLIP).
    loss: Literal["infonce", "siglip"] = "infonce"
    init_logit_scale: Optional[float] = None
    max_logit_scale: float = 100.0
    init_logit_bias: float = -10.0  # siglip only: SigLIP's initial bias (about -log batch)
    patch_dropout: float = 0.0
    # Image embedding: "avg" = the final LayerNorm on every token, then the mean of the patch
    # outputs (timm's global_pool="avg" with fc_norm=False: MAE fine-tuning instead takes the mean
    # and then a new LayerNorm, fc_norm; we keep the pretrained `norm` so the state dict stays
    # timm's ViT-B/32); "token" = the cls output, as OpenAI CLIP. In MAE the cls slot enters every
    # image as the same vector and the reconstruction loss never asks it to describe the image
    # (it reaches the loss only through the decoder's attention to it), so MAE training shapes it
    # into a large image-independent vector that the patches attend to, not a summary of the
    # image; the patch outputs carry the content, so a frozen MAE tower is pooled over them.
    vision_pool: Pool = "avg"
    # "gpt2": our causal tower (clip.model.text, sizes from `text`); "hf": a transformers encoder from
    # `hf_text.path` (clip.model.hf_text); then `text` keeps only what the tokenizer decides (vocab_size,
    # eot_id, pad_id) and the context length.
    text_tower: TextTower = "gpt2"
    hf_text: HFTextConfig = field(default_factory=HFTextConfig)
    # The normalisation of the pixels the image tower was trained on (of [0, 1] pixels): written by
    # the trainer from augment.mean / augment.std, read by evaluation, clip.load and the exports.
    image_mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    image_std: tuple[float, float, float] = OPENAI_DATASET_STD

    def __post_init__(self):
        if self.vision_pool not in get_args(Pool):
            raise ValueError(f"vision_pool must be one of {get_args(Pool)}, got {self.vision_pool!r}")
        if self.text_tower not in get_args(TextTower):
            raise ValueError(f"text_tower must be one of {get_args(TextTower)}, got {self.text_tower!r}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if not (self.logit_scale_init > 0 and self.max_logit_scale > 0):
            raise ValueError(f"init_logit_scale and max_logit_scale must be > 0, got {self.init_logit_scale} and "
                             f"{self.max_logit_scale}")
        if self.loss not in ("infonce", "siglip"):
            raise ValueError(f"loss must be infonce or siglip, got {self.loss!r}")
        if not all(s > 0 for s in self.image_std):
            raise ValueError(f"image_std must be > 0, got {list(self.image_std)}")

    @property
    def logit_scale_init(self) -> float:
        """``init_logit_scale``, or the objective's own: 1/0.07 (CLIP), 10 (SigLIP)."""
        if self.init_logit_scale is not None:
            return self.init_logit_scale
        return 10.0 if self.loss == "siglip" else 1 / 0.07


class CLIP(nn.Module):
    """Two-tower contrastive model.

    Args:
        cfg: tower configs, joint width, temperature init / cap and patch dropout rate.
        text_tower: a ready text tower (e.g. :func:`clip.model.hf_text.tower_from_config_json` when a
            checkpoint is loaded); by default it is built from ``cfg`` (for ``text_tower: hf``
            the pretrained encoder in ``cfg.hf_text.path``).
    """

    def __init__(self, cfg: CLIPConfig = CLIPConfig(), text_tower: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, patch_drop_rate=cfg.patch_dropout, global_pool=cfg.vision_pool)
        self.visual_proj = nn.Linear(cfg.vision.embed_dim, cfg.embed_dim, bias=False)
        if text_tower is None:
            text_tower = (tower_from_pretrained(cfg.hf_text, cfg.text.pad_id) if cfg.text_tower == "hf"
                          else TextTransformer(cfg.text))
        self.text = text_tower
        text_width = text_tower.embed_dim if isinstance(text_tower, HFTextTower) else cfg.text.embed_dim
        self.text_proj = nn.Linear(text_width, cfg.embed_dim, bias=False)
        # shape (1,), not (): DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.logit_scale_init)))
        if cfg.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
        self.trained_languages: list[str] | None = None  # caption languages of training, as load_clip reads them
        # CLIP's projection init: std = width ** -0.5
        nn.init.normal_(self.visual_proj.weight, std=cfg.vision.embed_dim ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text_width ** -0.5)

    def layer_index(self, name: str) -> tuple[str, int, int] | None:
        """``(tower, layer, layers)`` of the parameter ``name`` for layer-wise learning-rate decay,
        with the MAE / BEiT fine-tuning grouping: in each tower the embeddings (patch, position, cls,
        token, ``norm_pre``) are layer 0, block ``i`` is layer ``i + 1``, and what follows the
        blocks (the final norm) is layer ``depth + 1`` = ``layers``. None outside the towers (the
        projections, the temperature and bias train at the full rate)."""
        tower, _, rest = name.partition(".")
        if tower not in ("visual", "text") or not rest:
            return None
        if tower == "visual":
            depth, prefix = self.cfg.vision.depth, "blocks."
            embedding = rest.startswith(("patch_embed.", "pos_embed", "cls_token", "reg_token", "norm_pre."))
        elif isinstance(self.text, HFTextTower):
            depth, prefix = self.text.depth, "model.encoder.layer."
            embedding = rest.startswith("model.embeddings.")
        else:
            depth, prefix = self.cfg.text.depth, "blocks."
            embedding = rest.startswith(("token_embedding.", "pos_embed"))
        if embedding:
            return tower, 0, depth + 1
        if rest.startswith(prefix):
            return tower, int(rest[len(prefix):].split(".", 1)[0]) + 1, depth + 1
        return tower, depth + 1, depth + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (each block recomputed in backward)."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), at most ``max_logit_scale``. The trainer also clamps the parameter
        itself to [0, log max_logit_scale] after every step (as open_clip does), so it never sits
        past the cap where its gradient would be zero."""
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale).squeeze(0)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (B, 3, H, W) of any size divisible by the patch -> (B, E), L2-normalised unless
        ``normalize=False`` (then the projection itself, as open_clip's default returns)."""
        images = images.to(self.visual_proj.weight.dtype)  # pixels arrive in fp32 whatever the weights
        x = self.visual_proj(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids (B, T) with an EOT in every row -> (B, E), L2-normalised unless ``normalize=False``."""
        x = self.text_proj(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_crops(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """V crop batches [(B, 3, H_v, W_v)] -> (V, B, E) in input order.

        Crops of the same resolution go through the image tower as ONE batch (e.g. the two
        224 px globals as (2B, ...) and the four 96 px locals as (4B, ...)).
        """
        if not crops:
            raise ValueError("encode_crops needs at least one crop batch")
        B = crops[0].shape[0]
        if any(c.shape[0] != B for c in crops):
            raise ValueError(f"crop batches differ in size: {[c.shape[0] for c in crops]}")
        groups: dict[tuple[int, int], list[int]] = {}
        for v, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[-2:]), []).append(v)
        out: list[torch.Tensor | None] = [None] * len(crops)
        for idx in groups.values():
            feats = self.encode_image(torch.cat([crops[v] for v in idx]))  # (len(idx) * B, E)
            for v, f in zip(idx, feats.split(B)):
                out[v] = f
        return torch.stack(out)  # (V, B, E)

    def encode_captions(self, tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Caption slots (B, C, T) -> (B, C, E); slots with ``text_mask`` False are zero.

        Masked slots (whatever they hold) are run as a bare [EOT] row, which the text tower's
        EOT truncation makes almost free; no boolean indexing, so no host sync.
        """
        B, C, T = tokens.shape
        if isinstance(self.text, HFTextTower):
            blank = self.text.blank_like(tokens[0, 0])
        else:
            blank = torch.full_like(tokens[0, 0], self.cfg.text.pad_id)
            blank[0] = self.cfg.text.eot_id
        tokens = torch.where(text_mask[..., None], tokens, blank)  # (B, C, T)
        feats = self.encode_text(tokens.reshape(B * C, T))  # (B*C, E)
        return feats.reshape(B, C, -1) * text_mask[..., None].to(feats.dtype)  # (B, C, E)

    def forward(self, crops: list[torch.Tensor] | torch.Tensor | None, tokens: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None):
        """Training: ``crops`` a list of crop batches -> ``(image_features (V, B, E), text_features
        (B, C, E), scale)`` for ClipLoss; ``tokens`` is (B, C, T) (or (B, T) for one caption per
        image), ``text_mask`` (B, C) marks the valid slots (default: all).

        open_clip's call: ``model(images (B, 3, H, W), tokens (B, T))`` (either may be None) ->
        ``(image_features (B, E), text_features (M, E), logit_scale.exp())``, L2-normalised.
        """
        if not isinstance(crops, (list, tuple)):
            return (None if crops is None else self.encode_image(crops),
                    None if tokens is None else self.encode_text(tokens), self.scale())
        if tokens.ndim == 2:
            tokens = tokens[:, None]  # (B, 1, T)
        if text_mask is None:
            text_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.encode_crops(crops), self.encode_captions(tokens, text_mask), self.scale()
