"""The CLIP text tower: a GPT-2-style causal transformer pooled at the end-of-text token.

Follows CLIP (Radford et al. 2021) and KELIP (Ko & Gu 2022): token + learned position
embeddings, ``depth`` pre-LayerNorm blocks under a causal mask (timm ``Block`` with
``is_causal=True``, i.e. ``F.scaled_dot_product_attention``), a final LayerNorm ``norm``, and the
feature of the FIRST ``cfg.eot_id`` token of each row. KELIP's code pools at ``argmax(ids)``,
which is only right when EOT has the largest id; we look the token up explicitly.

Because attention is causal and we pool at EOT, a row's tokens after its EOT can never influence
its output. ``forward`` therefore runs the blocks on the captions packed end to end, without their
padding (N = sum of the lengths up to each EOT, instead of B x context): every per-token layer
(LayerNorms, qkv, projection, MLP) runs on the N real tokens, and only the attention itself is laid
out padded (B, T_max) as the causal SDPA kernel wants it, like FlashAttention's unpadded BERT. The
last block is needed only at the EOT tokens: its keys and values are computed for every token, its
queries, projection and MLP for the B EOT tokens only. Exactly the same features as running each
caption alone (tested), for the compute of the real tokens only (README: benchmarks).

Initialisation is GPT-2's: normal(0, 0.02) for linear and token-embedding weights, normal(0,
0.01) for the position embedding (as CLIP and GPT-2 do), zero biases, and the residual output
projections (``attn.proj`` and ``mlp.fc2``) at 0.02 / sqrt(2 * depth) so the residual stream's
variance does not grow with depth.

Legend: B batch, T tokens, D width (embed_dim).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

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

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {self.context_length}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.act_layer not in ("gelu", "quick_gelu"):
            raise ValueError(f"act_layer must be gelu or quick_gelu, got {self.act_layer!r}")


class TextTransformer(nn.Module):
    """Causal transformer over token ids (B, T) returning the EOT feature (B, D).

    Args:
        cfg: sizes, context length and the EOT / PAD ids of the tokenizer.
    """

    def __init__(self, cfg: TextConfig = TextConfig()):
        super().__init__()
        if cfg.eot_id == cfg.pad_id:  # it pools at the first EOT
            raise ValueError(f"TextConfig: eot_id and pad_id must differ (both {cfg.eot_id})")
        self.cfg = cfg
        D = cfg.embed_dim
        self.token_embedding = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, D))
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

    def eot_positions(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``(first_eot (B,), last_needed, n_tokens)``: index of the first ``eot_id`` in each row,
        the largest of them and the number of tokens up to every row's EOT (sum of first_eot + 1).
        ValueError if a row has no EOT. One host sync for all three."""
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be (B, T), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.context_length:
            raise ValueError(
                f"text tokens have length {tokens.shape[1]} > context_length "
                f"{self.cfg.context_length}")
        is_eot = tokens == self.cfg.eot_id  # (B, T)
        first = is_eot.int().argmax(dim=1)  # argmax returns the first maximum; 0 if no EOT
        first = torch.where(is_eot.any(dim=1), first, -1)  # (B,)
        lo, hi, total = torch.stack([first.min(), first.max(), first.sum()]).tolist()
        if lo < 0:
            rows = torch.nonzero(first < 0).flatten().tolist()
            raise ValueError(
                f"text rows {rows[:10]} contain no end-of-text token (eot_id={self.cfg.eot_id}); "
                "every caption must be [SOT] ... [EOT] [PAD]...")
        return first, hi, total + len(first)

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
        eot, last, n = self.eot_positions(tokens)  # (B,)
        B, T = tokens.shape[0], last + 1
        lengths = eot + 1  # (B,) tokens up to and including each row's EOT
        # The packed layout: row b's tokens 0..eot_b, rows one after another (N,).
        rows = torch.repeat_interleave(torch.arange(B, device=tokens.device), lengths, output_size=n)
        starts = torch.cumsum(lengths, 0) - lengths  # (B,) first packed index of each row
        pos = torch.arange(n, device=tokens.device) - starts[rows]  # (N,) position within the row
        flat = rows * T + pos  # (N,) index into the padded (B * T) layout
        x = self.token_embedding(tokens[rows, pos]) + self.pos_embed[0, pos]  # (N, D)
        *body, head = self.blocks
        for blk in body:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(packed_block, blk, x, flat, B, T, use_reentrant=False)
            else:
                x = packed_block(blk, x, flat, B, T)
        x = pooled_block(head, x, flat, B, T, starts + eot, lengths)  # (B, D)
        return self.norm(x)


def _padded(x: torch.Tensor, flat: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Packed rows (N, F) -> (B, T, F), zeros where there is no token."""
    return x.new_zeros(B * T, x.shape[1]).index_copy(0, flat, x).view(B, T, x.shape[1])


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    """(B, T, H * hd) -> (B, H, T, hd)."""
    B, T, _ = x.shape
    return x.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)


def packed_block(blk: Block, x: torch.Tensor, flat: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """timm ``Block`` under a causal mask on packed tokens x (N, D) (``flat``: their places in the
    padded (B, T) layout). Equals ``blk(padded, is_causal=True)`` at the real tokens: a causal
    query never sees the padding, which sits after its row's tokens."""
    attn = blk.attn
    q, k, v = _padded(attn.qkv(blk.norm1(x)), flat, B, T).chunk(3, dim=-1)  # (B, T, D) each
    q, k = attn.q_norm(_heads(q, attn)), attn.k_norm(_heads(k, attn))
    o = F.scaled_dot_product_attention(q, k, _heads(v, attn), is_causal=True,
                                       dropout_p=attn.attn_drop.p if blk.training else 0.0)  # (B, H, T, hd)
    o = o.transpose(1, 2).reshape(B * T, -1).index_select(0, flat)  # (N, D)
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(o)))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def pooled_block(blk: Block, x: torch.Tensor, flat: torch.Tensor, B: int, T: int, at: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
    """:func:`packed_block`'s output at the packed tokens ``at`` (B,) only (one per row, the row's
    last token): keys and values from every token, query, projection and MLP at those B tokens."""
    attn = blk.attn
    D = attn.num_heads * attn.head_dim
    h = blk.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    kv = F.linear(h, w[D:], None if b is None else b[D:])  # (N, 2D)
    k, v = _padded(kv, flat, B, T).chunk(2, dim=-1)  # (B, T, D) each
    q = F.linear(h[at], w[:D], None if b is None else b[:D])  # (B, D)
    q, k = attn.q_norm(_heads(q[:, None], attn)), attn.k_norm(_heads(k, attn))  # (B, H, 1, hd), (B, H, T, hd)
    keys = torch.arange(T, device=x.device) < lengths[:, None]  # (B, T): the row's tokens
    o = F.scaled_dot_product_attention(q, k, _heads(v, attn), attn_mask=keys[:, None, None],
                                       dropout_p=attn.attn_drop.p if blk.training else 0.0)  # (B, H, 1, hd)
    y = x[at] + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(o.reshape(B, D))))))
    return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
