"""The ViT image encoder shared by both stages (Dosovitskiy et al. 2021; ViT-B/32 by default).

It *is* timm's public ``VisionTransformer`` (no classifier head, cls-token pooling), so its state
dict loads unchanged into ``timm.create_model("vit_base_patch32_224")``. On top of timm it adds
what MAE and CLIP need: patch tokens with (interpolated) position embeddings for any image size,
and an encoder pass over an arbitrary subset of those tokens.

Legend: B batch, L patches, D width (embed_dim), Gh x Gw patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
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
    # A LayerNorm after the embeddings, before the blocks (timm's ``pre_norm``, OpenAI CLIP's
    # ``ln_pre``); timm then builds the patch projection without a bias. Off for MAE towers.
    pre_norm: bool = False


Pool = Literal["token", "avg"]  # the cls output, or the mean of the patch outputs


def run_blocks(blocks, x: torch.Tensor, checkpointing: bool = False, **kw) -> torch.Tensor:
    """The blocks in turn. With ``checkpointing`` (and a graph being built) each block keeps only
    its input and recomputes its activations in backward: less memory, one more forward."""
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False, **kw) if checkpointing and torch.is_grad_enabled() else blk(x, **kw)
    return x


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
            pre_norm=cfg.pre_norm,
        )
        self.cfg = cfg

    def resized_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings (1, 1 + Gh*Gw, D) for a Gh x Gw grid, bicubic-resized if needed."""
        if (grid_h, grid_w) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, (grid_h, grid_w), num_prefix_tokens=1)

    def patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed images into patch tokens with their position embeddings added.

        Returns ``(tokens, cls)``: tokens (B, L, D) in raster order, and the cls token with its
        own position embedding, (1, 1, D), for :meth:`forward_tokens`.
        """
        x = self.patch_embed(x)  # (B, Gh, Gw, D): dynamic_img_size keeps the grid
        B, Gh, Gw, D = x.shape
        pos = self.resized_pos_embed(Gh, Gw)  # (1, 1 + L, D)
        tokens = x.reshape(B, Gh * Gw, D) + pos[:, 1:]  # (B, L, D)
        cls = self.cls_token + pos[:, :1]  # (1, 1, D)
        return tokens, cls

    def forward_tokens(self, tokens: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Run the blocks on (a subset of) patch tokens (B, N, D) behind the cls token.

        Returns the normalised sequence (B, 1 + N, D); index 0 is the cls output.
        """
        x = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        x = self.norm_pre(x)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)
