"""Tests for mae/model.py: patchify, masking, decoder unshuffle, loss, init, export, timm parity."""
from __future__ import annotations

import math
import os

import pytest
import torch

from mae.checkpoint import MAE_FORMAT as CHECKPOINT_FORMAT, load_encoder_checkpoint, save_encoder_checkpoint
from mae.model import MAEConfig, MaskedAutoencoder, normalize_patches, num_kept, sincos_pos_embed_2d
from mae.vit import ViTConfig, VisionTransformer

# ViT-B/32 geometry (224 px, 7 x 7 = 49 patches, 12 kept) with tiny widths.
TINY_ENC = ViTConfig(img_size=224, patch_size=32, embed_dim=64, depth=2, num_heads=4)


def tiny(norm_pix_loss: bool = True, **kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    cfg = MAEConfig(encoder=TINY_ENC, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                    norm_pix_loss=norm_pix_loss, **kw)
    return MaskedAutoencoder(cfg)


def images(b: int = 3, size: int = 224, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_patchify_unpatchify_round_trip_and_layout():
    model = tiny()
    x = images(2)
    patches = model.patchify(x)
    assert patches.shape == (2, 49, 32 * 32 * 3)
    assert torch.equal(model.unpatchify(patches), x)
    # patch (row 1, col 2) holds that square, pixels ordered (row, column, channel) as MAE
    assert torch.equal(patches[1, 1 * 7 + 2], x[1, :, 32:64, 64:96].permute(1, 2, 0).reshape(-1))
    rect = torch.randn(2, 3, 96, 64)  # non-square grid round-trips with an explicit grid
    assert torch.equal(model.unpatchify(model.patchify(rect), grid_size=(3, 2)), rect)
    with pytest.raises(ValueError, match="divisible by 32"):
        model.patchify(torch.randn(1, 3, 100, 96))


def test_num_kept_rule():
    assert num_kept(49, 0.75) == 12 == int(49 * 0.25)
    assert num_kept(9, 0.75) == 2
    assert num_kept(10, 0.9) == 1  # 10 * (1 - 0.9) = 0.999...; the guard keeps 1
    assert num_kept(16, 0.0) == 16


def masked(model, x, ratio):
    """The kept tokens of x (B, L, D) under the model's masking, with its mask and restore order."""
    ids_keep, mask, ids_restore = model.random_masking(x.shape[0], x.shape[1], ratio, x.device)
    return x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2])), mask, ids_restore


def test_random_masking_counts_inverse_and_per_sample_sets():
    model = tiny()
    B, L, D = 8, 49, 5
    x = torch.arange(B * L * D, dtype=torch.float32).reshape(B, L, D)
    torch.manual_seed(0)
    kept, mask, ids_restore = masked(model, x, 0.75)
    assert kept.shape == (B, 12, D)
    assert mask.shape == (B, L) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [L - 12] * B
    # ids_restore is a permutation per row that undoes the shuffle: kept tokens land back in place
    assert torch.equal(ids_restore.sort(dim=1).values, torch.arange(L).expand(B, L))
    filler = torch.full((B, L - 12, D), -1.0)
    restored = torch.cat([kept, filler], dim=1).gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert (restored[~visible] == -1).all()
    kept_sets = {tuple(sorted(visible[b].nonzero().flatten().tolist())) for b in range(B)}
    assert len(kept_sets) > 1
    # ratio 0 keeps everything
    kept0, mask0, _ = masked(model, x, 0.0)
    assert kept0.shape == x.shape and mask0.sum() == 0
    with pytest.raises(ValueError, match="mask_ratio"):
        masked(model, x, 1.0)


def test_forward_matches_reference_without_shuffling():
    """Encoder on the kept patches in raster order, decoder on tokens placed by hand: same pred."""
    model = tiny()
    x = images(2)
    torch.manual_seed(5)
    _, pred, mask = model(x)
    enc = model.encoder
    tokens = enc.patch_embed(x).flatten(1, 2) + enc.pos_embed[:, 1:]  # (B, L, D): every patch, then masked
    cls = enc.cls_token + enc.pos_embed[:, :1]
    for b in range(2):
        keep = (mask[b] == 0).nonzero().flatten()  # raster order
        latent = enc.forward_tokens(tokens[b:b + 1, keep], cls)
        dec = model.decoder_embed(latent)
        full = model.mask_token.expand(1, 49, -1).clone()
        full[0, keep] = dec[0, 1:]
        y = torch.cat([dec[:, :1], full], dim=1) + model.decoder_pos_embed
        ref = model.decoder_pred(model.decoder_norm(model.decoder_blocks(y)))[:, 1:]
        torch.testing.assert_close(pred[b:b + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_formula_and_visible_patches_ignored(norm_pix):
    model = tiny(norm_pix_loss=norm_pix)
    p = 32
    x = images(2) * 3 + 1
    pred = torch.randn(2, 49, p * p * 3)
    torch.manual_seed(0)
    _, mask, _ = model.random_masking(2, 49, 0.75, torch.device("cpu"))
    loss = model.forward_loss(x, pred, mask)

    errors = []  # by hand, straight from the image
    for b in range(2):
        for l in range(49):
            if mask[b, l] == 1:
                i, j = divmod(l, 7)
                t = x[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
                errors.append(((pred[b, l] - t) ** 2).mean())
    torch.testing.assert_close(loss, torch.stack(errors).mean(), atol=1e-6, rtol=1e-5)

    moved = pred.clone()
    moved[mask == 0] += 10.0 * torch.randn_like(moved[mask == 0])
    assert torch.equal(model.forward_loss(x, moved, mask), loss)
    moved[mask == 1] += 1.0
    assert not torch.allclose(model.forward_loss(x, moved, mask), loss)


def test_norm_pix_target_statistics():
    patches = torch.randn(4, 49, 3072) * 5 + 3
    normed, mean, std = normalize_patches(patches)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(4, 49), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(-1), torch.ones(4, 49), atol=1e-4, rtol=0)
    torch.testing.assert_close(normed * std + mean, patches, atol=1e-5, rtol=1e-5)


def test_forward_backward_finite_and_grads_reach_both_halves():
    model = tiny()
    loss, pred, mask = model(images(2))
    assert pred.shape == (2, 49, 3072) and mask.shape == (2, 49)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name in ["encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.blocks.0.attn.qkv.weight",
                 "encoder.norm.weight", "decoder_embed.weight", "mask_token",
                 "decoder_blocks.0.mlp.fc1.weight", "decoder_pred.weight"]:
        g = model.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert model.encoder.pos_embed.grad is None and model.decoder_pos_embed.grad is None


def test_position_embeddings_fixed_sincos_and_not_trained():
    model = tiny()
    enc_pos = model.encoder.pos_embed
    assert not enc_pos.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(enc_pos.data, sincos_pos_embed_2d(64, 7, 7), rtol=0, atol=0)
    torch.testing.assert_close(model.decoder_pos_embed.data, sincos_pos_embed_2d(32, 7, 7), rtol=0, atol=0)
    # MAE layout by hand: D = 8 -> frequencies (1, 1/100); first half column, second half row
    table = sincos_pos_embed_2d(8, 3, 4)
    assert table.shape == (1, 1 + 12, 8) and torch.equal(table[0, 0], torch.zeros(8))
    r, c = 1, 2
    want = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
            math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
    torch.testing.assert_close(table[0, 1 + r * 4 + c], torch.tensor(want), atol=1e-6, rtol=0)
    # a training step leaves both tables untouched
    before = enc_pos.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(images(2))[0].backward()
    opt.step()
    assert torch.equal(enc_pos, before)


def test_initialisation_follows_mae():
    model = tiny()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and torch.equal(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    w = model.encoder.patch_embed.proj.weight  # xavier as a (64, 3*32*32) linear
    assert w.abs().max() <= math.sqrt(6 / (64 + 3072)) and w.std() > 0.5 * math.sqrt(2 / (64 + 3072))
    assert 0.01 < model.mask_token.std() < 0.03 and 0.01 < model.encoder.cls_token.std() < 0.03


def test_96px_input_and_non_square():
    model = tiny()
    loss, pred, mask = model(images(2, size=96))
    assert pred.shape == (2, 9, 3072) and mask.sum(1).tolist() == [7.0, 7.0]  # 2 of 9 kept
    assert torch.isfinite(loss)
    loss.backward()
    loss, pred, mask = model(torch.randn(2, 3, 96, 160))  # 3 x 5 grid
    assert pred.shape == (2, 15, 3072) and torch.isfinite(loss)


def test_reconstruct_pastes_visible_and_undoes_norm_pix():
    model = tiny()
    x = images(2)
    torch.manual_seed(3)
    _, pred, mask = model(x)
    torch.manual_seed(3)  # same masks
    masked, recon = model.reconstruct(x)
    assert masked.shape == recon.shape == x.shape
    px, pm, pr = model.patchify(x), model.patchify(masked), model.patchify(recon)
    vis = mask == 0
    assert torch.equal(pm[vis], px[vis]) and (pm[~vis] == 0).all()
    assert torch.equal(pr[vis], px[vis])
    _, mean, std = normalize_patches(px)
    torch.testing.assert_close(pr[~vis], (pred * std + mean)[~vis], atol=1e-5, rtol=1e-5)


def test_config_validation_and_dict_encoder():
    from mae.common.configs import build

    cfg = build(MAEConfig, {"encoder": {"img_size": 96, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}})
    assert cfg.encoder == ViTConfig(img_size=96, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_num_heads"):
        MAEConfig(decoder_embed_dim=48, decoder_num_heads=5)
    with pytest.raises(ValueError, match="expected images"):
        tiny()(torch.randn(2, 1, 224, 224))


def test_few_steps_reduce_loss():
    model = tiny()
    x = torch.nn.functional.interpolate(images(4, size=14), size=224, mode="bilinear")  # smooth images
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        torch.manual_seed(0)  # same masks each step
        loss = model(x)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_encoder_state_dict_loads_into_timm_vit_b32():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig())
    ref = timm.create_model("vit_base_patch32_224", pretrained=False, num_classes=0)
    state = model.encoder.state_dict()
    assert set(state) == set(ref.state_dict())
    assert not any(k.startswith(("decoder", "mask_token")) for k in state)
    ref.load_state_dict(state, strict=True)
    model.eval(), ref.eval()
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), ref(x), atol=1e-5, rtol=1e-5)


def test_encoder_checkpoint_save_load(tmp_path):
    model = tiny()
    path = tmp_path / "mae_ckpt.pt"
    save_encoder_checkpoint(model, path)
    assert os.listdir(tmp_path) == ["mae_ckpt.pt"]  # no temp file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["config"]["embed_dim"] == 64
    cfg, state = load_encoder_checkpoint(path)
    assert cfg == TINY_ENC
    fresh = VisionTransformer(cfg)
    fresh.load_state_dict(state, strict=True)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(state[k], v), k
    save_encoder_checkpoint(model, path)  # overwrite in place
    assert load_encoder_checkpoint(path)[0] == TINY_ENC

    bad = tmp_path / "bad.pt"
    torch.save({"format": "something/else", "config": {}, "model": {}}, bad)
    with pytest.raises(ValueError, match="'format'"):
        load_encoder_checkpoint(bad)
    torch.save({"config": {}, "model": {}}, bad)
    with pytest.raises(ValueError, match="'format'"):
        load_encoder_checkpoint(bad)
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"nope": 1}, "model": {}}, bad)
    with pytest.raises(ValueError, match="'config'"):
        load_encoder_checkpoint(bad)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pt"):
        load_encoder_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_encoder_checkpoint(tmp_path / "missing.pt")
