"""Image-tower initialisation from a timm ViT state dict (a pretrained tower other than our MAE).

Parallel Multilingual CLIP starts from a pretrained image encoder. Our image tower *is* timm's
``VisionTransformer`` (:mod:`mae.vit`), so the weights of a timm ViT of the same shape load by
name: e.g. a user's local ``vit_base_patch32_clip_224`` (``pre_norm``, no patch bias) or
``vit_base_patch32_224`` weights, as ``.safetensors`` (read with ``safetensors``) or
``.pt`` / ``.pth`` / ``.bin`` (read with ``torch.load(weights_only=True)``: never executes code).

The tower's shape is read from the tensors (width, depth, patch, image size, MLP ratio, pre-norm);
the number of heads cannot be, and is taken from the configured ``model.vision``. The classifier
or projection ``head`` (and an identity ``fc_norm``) is dropped, as ``timm.create_model(...,
num_classes=0)`` would. Anything else that does not fit is reported by
:func:`clip.interop.init.load_image_tower` in one line.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace

import torch

from mae.vit import ViTConfig

_PREFIXES = ("visual.trunk.",)  # open_clip's timm towers


def timm_vit_config(state: dict[str, torch.Tensor], num_heads: int, where: str) -> ViTConfig:
    """The :class:`ViTConfig` a timm ViT state dict was built with (``num_heads`` given)."""
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{where}: not OpenAI CLIP's layout and not a timm ViT state dict (no {', '.join(missing)}; "
                         f"keys start {sorted(state)[:3]})")
    D, C, P, _ = state["patch_embed.proj.weight"].shape
    n_patches = state["pos_embed"].shape[1] - 1  # the cls position comes first
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"{where}: {n_patches} position embeddings is not a square grid plus one cls token")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return ViTConfig(img_size=grid * P, patch_size=P, in_chans=C, embed_dim=D, depth=depth, num_heads=num_heads,
                     mlp_ratio=hidden / D, pre_norm="norm_pre.weight" in state)


def load_timm_vit(state: dict[str, torch.Tensor], num_heads: int, where: str) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """``(ViTConfig, encoder state dict)`` of a timm ViT state dict, the classifier head dropped."""
    for pre in _PREFIXES:
        if all(k.startswith(pre) for k in state):
            state = {k[len(pre):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "fc_norm.weight" not in state:
        state = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
    cfg = timm_vit_config(state, num_heads, where)
    if cfg.embed_dim % cfg.num_heads:  # the configured heads do not divide this width: OpenAI's rule
        cfg = replace(cfg, num_heads=max(1, cfg.embed_dim // 64))
    return cfg, state
