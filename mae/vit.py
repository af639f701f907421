"""The ViT image encoder shared by both stages (Dosovitskiy et al. 2021; ViT-B/32 by default).

It *is* timm's public ``VisionTransformer`` (no classifier head, cls-token pooling), so its state
dict loads unchanged into ``timm.create_model("vit_base_patch32_224")``. On top of timm it adds
what MAE and CLIP need: patch tokens with (interpolated) position embeddings for any image size,
and an encoder pass over an arbitrary subset of those tokens.

Legend: B batch, L patches, D width (embed_dim), Gh x Gw patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import VisionTransformer as _TimmViT


@dataclass(frozen=True)
class ViTConfig:
    """Encoder sizes. The defaults are ViT-B/32 at 224 px."""

    img_size: int = 224
    patch_size: int = 32
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # OpenAI CLIP's ViT (and open_clip's ViT-B-32) differ from timm's default ViT in three settings:
    # a LayerNorm before the blocks (`ln_pre`; timm's `pre_norm`, which also drops the patch-embed
    # bias), LayerNorm eps 1e-5 instead of 1e-6, and QuickGELU in OpenAI's weights.
    pre_norm: bool = False
    norm_eps: float = 1e-6
    act_layer: Literal["gelu", "quick_gelu"] = "gelu"

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.act_layer not in ("gelu", "quick_gelu"):
            raise ValueError(f"act_layer must be gelu or quick_gelu, got {self.act_layer!r}")
        if not self.mlp_ratio > 0 or not self.norm_eps > 0:
            raise ValueError(f"mlp_ratio and norm_eps must be > 0, got {self.mlp_ratio} and {self.norm_eps}")


Pool = Literal["token", "avg"]  # the cls output, or the mean of the patch outputs


def run_blocks(blocks, x: torch.Tensor, checkpointing: bool = False, **kw) -> torch.Tensor:
    """The blocks in turn. With ``checkpointing`` (and a graph being built) each block keeps only
    its input and recomputes its activations in backward: less memory, one more forward."""
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False, **kw) if checkpointing and torch.is_grad_enabled() else blk(x, **kw)
    return x


def tower_options(cfg: ViTConfig) -> dict:
    """timm keyword arguments for the non-default settings only, so a default config builds exactly
    timm's default ViT (norm layer, activation, patch-embed bias)."""
    kw = {}
    if cfg.pre_norm:
        kw["pre_norm"] = True
    if cfg.norm_eps != 1e-6:
        kw["norm_layer"] = partial(nn.LayerNorm, eps=cfg.norm_eps)
    if cfg.act_layer != "gelu":
        kw["act_layer"] = cfg.act_layer
    return kw


class VisionTransformer(_TimmViT):
    """timm ViT with a pooled output and position embeddings resized to any input size.
    ``set_grad_checkpointing(True)`` (timm's) checkpoints every block in both forward paths.

    Args:
        cfg: encoder sizes.
        patch_drop_rate: FLIP-style share of patch tokens dropped at random in training
            (timm's ``PatchDropout``; the cls token is always kept). 0 disables it.
        global_pool: ``"token"`` (the cls output) or ``"avg"`` (mean of the patch outputs).
            Either way the final LayerNorm is applied to every token before pooling
            (``fc_norm=False``), so the state dict is the same and loads into timm's ViT-B/32.
    """

    def __init__(self, cfg: ViTConfig = ViTConfig(), patch_drop_rate: float = 0.0, global_pool: Pool = "token"):
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            global_pool=global_pool,
            fc_norm=False,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            dynamic_img_size=True,  # 96 px crops get interpolated position embeddings
            patch_drop_rate=patch_drop_rate,
            **tower_options(cfg),
        )
        self.cfg = cfg

    def resized_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings (1, 1 + Gh*Gw, D) for a Gh x Gw grid, bicubic-resized if needed."""
        if (grid_h, grid_w) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, (grid_h, grid_w), num_prefix_tokens=1)

    def forward_tokens(self, tokens: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Run the blocks on (a subset of) patch tokens (B, N, D), position embeddings added, behind
        ``cls`` (1, 1, D), the cls token with its own position embedding (MAE's encoder pass).

        Returns the normalised sequence (B, 1 + N, D); index 0 is the cls output.
        """
        x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        x = self.norm_pre(x)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)
