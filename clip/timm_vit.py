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
:func:`clip.model.load_visual_state` in one line.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from mae.checkpoint import load_checkpoint
from mae.vit import ViTConfig

TIMM_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_WRAPPERS = ("state_dict", "model", "module")  # where training scripts nest a state dict
_PREFIXES = ("module.", "model.", "visual.trunk.")  # DDP, wrappers, open_clip's timm towers


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a safetensors file or a weights-only torch file (ValueError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # a torn or foreign file
            raise ValueError(f"{path}: not a safetensors file ({type(e).__name__})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not loadable with weights_only=True ({type(e).__name__}); refusing to load it") from None
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and "format" not in obj:
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return obj


def timm_vit_config(state: dict[str, torch.Tensor], num_heads: int, where: str) -> ViTConfig:
    """The :class:`ViTConfig` a timm ViT state dict was built with (``num_heads`` given)."""
    need = ("patch_embed.proj.weight", "pos_embed", "cls_token")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"{where}: not a timm ViT state dict (no {', '.join(missing)}; keys start "
                         f"{sorted(state)[:3]})")
    D, C, P, _ = state["patch_embed.proj.weight"].shape
    n_patches = state["pos_embed"].shape[1] - 1  # the cls position comes first
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ValueError(f"{where}: {n_patches} position embeddings is not a square grid plus one cls token")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return ViTConfig(img_size=grid * P, patch_size=P, in_chans=C, embed_dim=D, depth=depth, num_heads=num_heads,
                     mlp_ratio=hidden / D, pre_norm="norm_pre.weight" in state)


def load_timm_vit(path: str | os.PathLike, num_heads: int) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """``(ViTConfig, encoder state dict)`` of a timm ViT file, the classifier head dropped."""
    where = os.fspath(path)
    state = read_state_dict(path)
    for pre in _PREFIXES:
        if all(k.startswith(pre) for k in state):
            state = {k[len(pre):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "fc_norm.weight" not in state:
        state = {k: v for k, v in state.items() if not k.startswith("fc_norm.")}
    return timm_vit_config(state, num_heads, where), state


def load_image_init(path: str | os.PathLike, vision: ViTConfig) -> tuple[ViTConfig, dict[str, torch.Tensor], str]:
    """``(ViTConfig, state dict, what it is)`` of an ``--init`` file: our ``mae_ckpt.pt`` export, or a
    timm ViT state dict (``num_heads`` from ``vision``). ValueError / FileNotFoundError in one line."""
    from mae.checkpoint import MAE_FORMAT

    where = os.fspath(path)
    if not Path(where).is_file():
        raise FileNotFoundError(f"checkpoint not found: {where}")
    if Path(where).suffix != ".safetensors":
        try:
            ckpt = load_checkpoint(where, MAE_FORMAT)
        except ValueError as e:
            if "no key 'format'" not in str(e) and "not an enko-clip checkpoint" not in str(e):
                raise  # a CLIP checkpoint, a pickle, a torn file: say so rather than guess
        else:
            try:
                return ViTConfig(**ckpt["config"]), ckpt["model"], "MAE encoder"
            except TypeError as e:
                raise ValueError(f"{where}: key 'config' is not a ViTConfig ({e})") from None
    cfg, state = load_timm_vit(where, vision.num_heads)
    if cfg.embed_dim % cfg.num_heads:
        cfg = replace(cfg, num_heads=max(1, cfg.embed_dim // 64))
    return cfg, state, "timm ViT"
