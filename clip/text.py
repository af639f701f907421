"""The CLIP text tower: a GPT-2-style causal transformer pooled at the end-of-text token.

Follows CLIP (Radford et al. 2021) and KELIP (Ko & Gu 2022): token + learned position
embeddings, ``depth`` pre-LayerNorm blocks under a causal mask (timm ``Block`` with
``is_causal=True``, i.e. ``F.scaled_dot_product_attention``), a final LayerNorm ``norm``, and the
feature of the FIRST ``cfg.eot_id`` token of each row. KELIP's code pools at ``argmax(ids)``,
which is only right when EOT has the largest id; we look the token up explicitly.

Because attention is causal and we pool at EOT, the tokens after the last EOT of a batch can
never influence the output: ``forward`` cuts the batch to that length before the blocks (exactly the
same result, for less work on short captions).

Initialisation is GPT-2's: normal(0, 0.02) for linear and token-embedding weights, normal(0,
0.01) for the position embedding (as CLIP and GPT-2 do), zero biases, and the residual output
projections (``attn.proj`` and ``mlp.fc2``) at 0.02 / sqrt(2 * depth) so the residual stream's
variance does not grow with depth.

Legend: B batch, T tokens, D width (embed_dim).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import torch
from timm.layers import get_act_layer
from timm.models.vision_transformer import Block
from torch import nn

from mae.vit import run_blocks


@dataclass(frozen=True)
class TextConfig:
    """Text tower sizes and the two special ids it must know (from the tokenizer)."""

    vocab_size: int = 98304
    context_length: int = 77
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    eot_id: int = 2
    pad_id: int = 0
    # QuickGELU and LayerNorm eps: OpenAI CLIP's text tower (and KELIP's) uses QuickGELU.
    act_layer: Literal["gelu", "quick_gelu"] = "gelu"
    norm_eps: float = 1e-5


def text_config_for(cfg: TextConfig, tokenizer) -> TextConfig:
    """``cfg`` with the vocabulary size and the EOT / PAD ids of ``tokenizer``: the tokenizer, not
    the config, decides them. The context length stays the config's (the tokenizer is asked for it)."""
    return replace(cfg, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)


class TextTransformer(nn.Module):
    """Causal transformer over token ids (B, T) returning the EOT feature (B, D).

    Args:
        cfg: sizes, context length and the EOT / PAD ids of the tokenizer.
    """

    def __init__(self, cfg: TextConfig = TextConfig()):
        super().__init__()
        if cfg.eot_id == cfg.pad_id:
            raise ValueError(f"TextConfig: eot_id and pad_id must differ (both {cfg.eot_id})")
        self.cfg = cfg
        D = cfg.embed_dim
        self.token_embedding = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, D))
        if cfg.act_layer not in ("gelu", "quick_gelu"):
            raise ValueError(f"TextConfig.act_layer must be 'gelu' or 'quick_gelu', got {cfg.act_layer!r}")
        norm = nn.LayerNorm if cfg.norm_eps == 1e-5 else partial(nn.LayerNorm, eps=cfg.norm_eps)
        act = nn.GELU if cfg.act_layer == "gelu" else get_act_layer(cfg.act_layer)
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm, act_layer=act)
             for _ in range(cfg.depth)]
        )
        self.norm = norm(D)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.depth)  # 2 residual branches per block
        for blk in self.blocks:
            nn.init.normal_(blk.attn.proj.weight, std=residual_std)
            nn.init.normal_(blk.mlp.fc2.weight, std=residual_std)

    def eot_positions(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(first_eot (B,), last_needed)``: index of the first ``eot_id`` in each row and the
        largest of them. ValueError if a row has no EOT. One host sync for both checks."""
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be (B, T), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(
                f"text tokens have length {tokens.shape[1]} > context_length "
                f"{self.cfg.context_length}")
        is_eot = tokens == self.cfg.eot_id  # (B, T)
        first = is_eot.int().argmax(dim=1)  # argmax returns the first maximum; 0 if no EOT
        first = torch.where(is_eot.any(dim=1), first, -1)  # (B,)
        lo, hi = torch.stack([first.min(), first.max()]).tolist()
        if lo < 0:
            rows = torch.nonzero(first < 0).flatten().tolist()
            raise ValueError(
                f"text rows {rows[:10]} contain no end-of-text token (eot_id={self.cfg.eot_id}); "
                "every caption must be [SOT] ... [EOT] [PAD]...")
        return first, hi

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states (B, T, D) of every position (no truncation, no pooling)."""
        return self.norm(self._blocks(tokens))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them."""
        self.grad_checkpointing = enable

    def _blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.token_embedding(tokens) + self.pos_embed[:, :T]  # (B, T, D)
        return run_blocks(self.blocks, x, self.grad_checkpointing, is_causal=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        eot, last = self.eot_positions(tokens)  # (B,)
        # Causal attention: positions after the last EOT cannot affect any pooled feature.
        x = self._blocks(tokens[:, :last + 1])  # (B, T', D)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, D)
        return self.norm(x)  # LayerNorm is per token: normalising after the gather is the same
