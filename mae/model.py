"""Masked-autoencoder pretraining of the ViT encoder (He et al. 2022, "Masked Autoencoders Are
Scalable Vision Learners"), following the reference code (facebookresearch/mae, models_mae.py).

Each image keeps a random ``floor(L * (1 - mask_ratio))`` of its patches (12 of 49 for ViT-B/32
at 224 px and ratio 0.75). The encoder (:class:`mae.vit.VisionTransformer`) embeds and encodes
only those and the cls token; a light decoder gets the encoded tokens back in place, a learned mask token in every
other slot, and predicts the pixels of every patch; the loss is the MSE on the masked patches,
against per-patch normalised pixels by default (``norm_pix_loss``). Encoder and decoder position
embeddings are fixed 2-D sin-cos tables (not trained here; CLIP trains the encoder's later).

Legend: B batch, L patches, K kept (visible) patches, D encoder width, Dd decoder width,
P = patch·patch·3 pixels per patch, Gh x Gw patch grid, C channels, p patch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from mae.vit import ViTConfig, VisionTransformer, run_blocks


@dataclass(frozen=True)
class MAEConfig:
    """MAE sizes. Defaults: ViT-B/32 encoder, MAE's 8-block 512-wide decoder, 75% masking.

    The decoder's MLP uses the encoder's ``mlp_ratio`` (4, as in MAE).
    """

    encoder: ViTConfig = ViTConfig()
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def __post_init__(self):
        for name in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_mask_ratio(self.mask_ratio)
        for name in ("encoder.embed_dim", "decoder_embed_dim"):
            dim = self.encoder.embed_dim if name == "encoder.embed_dim" else self.decoder_embed_dim
            if dim % 4:
                raise ValueError(f"{name} must be divisible by 4 for 2-D sin-cos embeddings, got {dim}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )


def check_mask_ratio(mask_ratio: float) -> None:
    """At least one patch must stay visible: the ratio is in [0, 1)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table, (1 [+ 1] + Gh*Gw, D) in raster order.

    As in MAE's ``get_2d_sincos_pos_embed`` (its meshgrid puts w first), the first half of each
    vector encodes the column and the second the row, each as [sin | cos] over D/4 frequencies
    1 / 10000^(i / (D/4)). The cls row is zeros.
    """
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )  # (Gh, Gw) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # (L, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (L, D/2)

    table = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # (L, D)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)  # (1 + L, D)
    return table.float().unsqueeze(0)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: floor(L * (1 - mask_ratio)), MAE's ``int()`` rule.

    A 1e-6 guard absorbs float error, so that 10 patches at ratio 0.9 keep 1, not 0.
    """
    return int(num_patches * (1.0 - mask_ratio) + 1e-6)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6):
    """Per-patch normalisation of the ``norm_pix_loss`` target, as MAE's code.

    Returns ``(normed, mean, std)``; mean and std are (..., 1), with the unbiased variance and
    ``std = sqrt(var + eps)``, so ``normed * std + mean`` gives the pixels back.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def _init_module(m: nn.Module) -> None:
    # MAE: xavier-uniform linears (zero bias), unit LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MaskedAutoencoder(nn.Module):
    """ViT encoder + light decoder trained to reconstruct masked patches.

    Args:
        cfg: encoder and decoder sizes, mask ratio, loss target.

    Frozen parameters (``requires_grad=False``): ``encoder.pos_embed`` and ``decoder_pos_embed``;
    build the optimiser from the parameters that require grad.
    """

    def __init__(self, cfg: MAEConfig = MAEConfig()):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = VisionTransformer(enc)
        grid_h, grid_w = self.encoder.patch_embed.grid_size

        self.decoder_embed = nn.Linear(enc.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, 1 + grid_h * grid_w, cfg.decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.Sequential(*[
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, enc.mlp_ratio, qkv_bias=True)
            for _ in range(cfg.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, enc.patch_size**2 * enc.in_chans)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE's initialisation; fixes both position tables to sin-cos and freezes them."""
        self.apply(_init_module)
        grid_h, grid_w = self.encoder.patch_embed.grid_size
        self.encoder.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.encoder.embed_dim, grid_h, grid_w))
        self.encoder.pos_embed.requires_grad_(False)
        self.decoder_pos_embed.copy_(sincos_pos_embed_2d(self.cfg.decoder_embed_dim, grid_h, grid_w))
        w = self.encoder.patch_embed.proj.weight  # (D, C, p, p): initialised as a (D, C*p*p) linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- pixels <-> patches -------------------------------------------------------------------

    def _grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        p, c = self.cfg.encoder.patch_size, self.cfg.encoder.in_chans
        if imgs.ndim != 4 or imgs.shape[1] != c or imgs.shape[2] % p or imgs.shape[3] % p:
            raise ValueError(
                f"expected images (B, {c}, H, W) with H and W divisible by {p}, got {tuple(imgs.shape)}"
            )
        return imgs.shape[2] // p, imgs.shape[3] // p

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, P), patches in raster order, pixels ordered (row, column, channel)."""
        B, C = imgs.shape[:2]
        (gh, gw), p = self._grid(imgs), self.cfg.encoder.patch_size
        x = imgs.reshape(B, C, gh, p, gw, p)
        x = torch.einsum("bchpwq->bhwpqc", x)  # (B, Gh, Gw, p, p, C)
        return x.reshape(B, gh * gw, p * p * C)  # (B, L, P)

    def unpatchify(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, L, P) -> (B, C, H, W); ``grid_size`` (Gh, Gw) defaults to a square grid."""
        B, L, _ = x.shape
        gh, gw = grid_size or self._square_grid(L)
        p, C = self.cfg.encoder.patch_size, self.cfg.encoder.in_chans
        x = x.reshape(B, gh, gw, p, p, C)
        x = torch.einsum("bhwpqc->bchpwq", x)  # (B, C, Gh, p, Gw, p)
        return x.reshape(B, C, gh * p, gw * p)

    @staticmethod
    def _square_grid(num_patches: int) -> tuple[int, int]:
        side = round(num_patches**0.5)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches are not a square grid; pass grid_size=(Gh, Gw)")
        return side, side

    # ---- masking, encoder, decoder, loss ------------------------------------------------------

    def random_masking(self, B: int, L: int, mask_ratio: float, device: torch.device):
        """Per-sample random masking by argsort of uniform noise (MAE): ``num_kept(L, mask_ratio)``
        patches stay per sample. Returns ``(ids_keep (B, K), mask (B, L) float with 1 = masked,
        ids_restore (B, L))``; ``ids_restore`` puts the shuffled sequence (kept first) back in
        raster order."""
        check_mask_ratio(mask_ratio)
        keep = num_kept(L, mask_ratio)
        noise = torch.rand(B, L, device=device)
        ids_shuffle = noise.argsort(dim=1)  # (B, L): lowest noise first = kept
        ids_restore = ids_shuffle.argsort(dim=1)  # (B, L): rank of each patch in the shuffle
        mask = (ids_restore >= keep).float()  # (B, L): a patch is masked iff ranked past K
        return ids_shuffle[:, :keep], mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
        """Encode the visible patches: returns ``(latent (B, 1 + K, D), mask, ids_restore)``.

        Only the kept patches are embedded: the stride-p patch convolution is a linear map of each
        patch's pixels, so the pixels are gathered first and the masked 75% cost nothing, forward
        or back (the same tokens as embedding every patch and then masking, as the tests check).
        """
        gh, gw = self._grid(imgs)
        B, C = imgs.shape[:2]
        enc, p = self.encoder, self.cfg.encoder.patch_size
        ids_keep, mask, ids_restore = self.random_masking(B, gh * gw, mask_ratio, imgs.device)
        pixels = imgs.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, Gh, Gw, C, p, p)
        pixels = pixels.reshape(B, gh * gw, C * p * p)  # (B, L, C*p*p): the conv weight's order
        pixels = pixels.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, C * p * p))  # (B, K, C*p*p)
        proj = enc.patch_embed.proj
        pixels = pixels.to(proj.weight.dtype)  # fp32 pixels in, the weights' dtype from here
        tokens = enc.patch_embed.norm(F.linear(pixels, proj.weight.flatten(1), proj.bias))  # (B, K, D)
        pos = enc.resized_pos_embed(gh, gw)  # (1, 1 + L, D)
        D = pos.shape[-1]
        tokens = tokens + pos[:, 1:].expand(B, -1, -1).gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        cls = enc.cls_token + pos[:, :1]  # (1, 1, D)
        return enc.forward_tokens(tokens, cls), mask, ids_restore

    def decoder_pos(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Decoder position table (1, 1 + Gh*Gw, Dd), resized the way the encoder's is."""
        if (grid_h, grid_w) == tuple(self.encoder.patch_embed.grid_size):
            return self.decoder_pos_embed
        return resample_abs_pos_embed(self.decoder_pos_embed, (grid_h, grid_w), num_prefix_tokens=1)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Predict every patch's pixels (B, L, P) from the latent (B, 1 + K, D).

        ``grid_size`` (Gh, Gw) places the position embeddings; it defaults to a square grid.
        """
        gh, gw = grid_size or self._square_grid(ids_restore.shape[1])
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        B, N, Dd = x.shape
        mask_tokens = self.mask_token.expand(B, ids_restore.shape[1] + 1 - N, Dd)  # (B, L - K, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd), shuffled order
        x_ = x_.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # (B, L, Dd), raster order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos(gh, gw)  # (B, 1 + L, Dd)
        x = self.decoder_norm(run_blocks(self.decoder_blocks, x, self.encoder.grad_checkpointing))
        return self.decoder_pred(x[:, 1:])  # (B, L, P): cls dropped before the head (MAE: after)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only, in fp32, against targets from the
        pixels as given (fp32 from the trainer, whatever the weights' precision)."""
        target = self.patchify(imgs).float()  # (B, L, P)
        if self.cfg.norm_pix_loss:
            target = normalize_patches(target)[0]
        loss = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None):
        """Returns ``(loss, pred (B, L, P), mask (B, L))``; ``mask_ratio`` defaults to the config's."""
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore, self._grid(imgs))
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float | None = None):
        """Images for a visualisation grid, in the input's (normalised) pixel space.

        Returns ``(masked_imgs, recon_imgs)``, both (B, C, H, W): the input with masked patches set
        to 0, and the prediction (norm-pix undone with each target patch's own mean and std) with the
        visible patches pasted from the input, as MAE's visualisation does.
        """
        _, pred, mask = self(imgs, mask_ratio)
        grid = self._grid(imgs)
        patches = self.patchify(imgs).float()  # (B, L, P)
        pred = pred.float()
        if self.cfg.norm_pix_loss:
            _, mean, std = normalize_patches(patches)
            pred = pred * std + mean
        m = mask.unsqueeze(-1)  # (B, L, 1)
        visible = patches * (1 - m)
        return self.unpatchify(visible, grid), self.unpatchify(visible + pred * m, grid)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the encoder and the decoder (each block recomputed in backward)."""
        self.encoder.set_grad_checkpointing(enable)
