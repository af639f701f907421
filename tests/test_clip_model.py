"""Text tower (causality, EOT pooling, init), CLIP model (crops, patch dropout, checkpoints)."""
from __future__ import annotations

import math
from dataclasses import asdict, replace

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from clip.interop.init import read_init
from clip.model import CLIP, CLIPConfig, load_clip, save_clip
from mae.checkpoint import load_encoder_checkpoint
from launch.runtime.optim import param_groups
from clip.model.text import TextConfig, TextTransformer
from mae.vit import ViTConfig, VisionTransformer

TEXT = TextConfig(vocab_size=50, context_length=12, embed_dim=16, depth=2, num_heads=2,
                  eot_id=2, pad_id=0)
# real ViT-B/32 geometry (224 px, /32 patches, so 96 px crops are a 3x3 grid) at toy width
VISION = ViTConfig(img_size=224, patch_size=32, embed_dim=16, depth=2, num_heads=2)
CFG = CLIPConfig(vision=VISION, text=TEXT, embed_dim=8)


def _tokens(lengths, T=12, seed=0):
    """Rows [SOT=1] ids... [EOT=2] [PAD=0]... with the given number of tokens before EOT."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        tok[i, 0] = 1
        tok[i, 1:n] = torch.randint(3, 50, (n - 1,), generator=g)
        tok[i, n] = 2
    return tok


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    return TextTransformer(TEXT).eval()


def test_text_causal_mask(text_model):
    tok = _tokens([10, 10])
    h = text_model.forward_features(tok)  # (B, T, D)
    tok2 = tok.clone()
    tok2[:, 6] = 7 if tok[0, 6] != 7 else 8
    h2 = text_model.forward_features(tok2)
    assert torch.allclose(h[:, :6], h2[:, :6], atol=1e-6)
    assert (h[:, 6:] - h2[:, 6:]).abs().amax(dim=-1).min() > 1e-4  # every later position moves


def test_text_pools_first_eot_and_ignores_padding(text_model):
    tok = _tokens([3, 7, 11])
    tok[0, 6] = 2  # a second EOT after the first one: pooling must use position 3
    pooled = text_model(tok)
    h = text_model.forward_features(tok)
    for i, pos in enumerate([3, 7, 11]):
        assert torch.allclose(pooled[i], h[i, pos], atol=1e-5)
    # a different padding after EOT (and a longer row than the batch max) changes nothing
    tok2 = tok.clone()
    tok2[0, 4:] = torch.randint(3, 50, (8,))
    tok2[1, 8:] = 5
    assert torch.allclose(text_model(tok2)[:2], pooled[:2], atol=1e-5)
    # a row padded to the full context gives the same as the same row cut at its EOT
    assert torch.allclose(text_model(tok[1:2, :8]), pooled[1:2], atol=1e-5)
    # not argmax of the ids: the largest id is elsewhere in every row
    assert all(tok[i].argmax() != p for i, p in enumerate([3, 7, 11]))


def test_packed_text_tower_equals_each_caption_alone():
    """forward packs the captions without their padding (and runs the last block at EOT only):
    features AND gradients equal running every caption alone over its own tokens, in float64,
    with and without activation checkpointing; a bare [EOT] row and junk after EOT included."""
    torch.manual_seed(0)
    m = TextTransformer(replace(TEXT, depth=3)).double().train()
    lengths = [0, 4, 11, 2, 7]  # tokens before EOT; 0 = a bare [EOT] (a masked caption slot)
    tok = _tokens([max(n, 1) for n in lengths], seed=3)
    tok[0, 0], tok[0, 1:] = 2, torch.randint(3, 50, (11,))  # EOT first, then junk
    tok[3, 3:] = 2  # EOT repeated up to the end: the first one counts
    out = m(tok)
    alone = torch.stack([m.forward_features(tok[i:i + 1, :n + 1])[0, n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(out, alone, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    params = list(m.parameters())
    want = torch.autograd.grad((alone * g).sum(), params)
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        got = torch.autograd.grad((m(tok) * g).sum(), params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert want[0].abs().sum() > 0  # the token embedding is reached


def test_text_rejects_rows_without_eot(text_model):
    tok = _tokens([3, 5])
    tok[1, 5] = 9
    with pytest.raises(ValueError, match=r"rows \[1\] contain no end-of-text"):
        text_model(tok)
    with pytest.raises(ValueError, match="context_length"):
        text_model(torch.full((1, 13), 2))


def test_text_gpt2_init():
    torch.manual_seed(0)
    depth = 6
    m = TextTransformer(TextConfig(vocab_size=1000, embed_dim=256, depth=depth, num_heads=4))
    want = 0.02 / math.sqrt(2 * depth)
    for blk in m.blocks:
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert abs(w.std().item() - want) < 0.03 * want
        assert abs(blk.attn.qkv.weight.std().item() - 0.02) < 0.03 * 0.02
        assert blk.attn.qkv.bias.abs().max() == 0
    assert abs(m.token_embedding.weight.std().item() - 0.02) < 0.03 * 0.02
    assert abs(m.pos_embed.std().item() - 0.01) < 0.05 * 0.01


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CLIP(CFG).eval()


def test_encode_crops_batches_by_size_and_matches_single_crops(model):
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 224, 224) for _ in range(2)] + [torch.randn(2, 3, 96, 96)
                                                                for _ in range(3)]
    crops.insert(1, torch.randn(2, 3, 96, 96))  # mixed order: 224, 96, 224, 96, 96, 96
    calls = []
    h = model.visual.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
    try:
        out = model.encode_crops(crops)
    finally:
        h.remove()
    assert out.shape == (6, 2, 8)
    assert sorted(calls) == [(4, 3, 224, 224), (8, 3, 96, 96)]  # one forward per resolution
    single = torch.stack([model.encode_image(c) for c in crops])
    assert torch.allclose(out, single, atol=1e-5)
    assert torch.allclose(out.norm(dim=-1), torch.ones(6, 2), atol=1e-5)


def test_96px_position_embedding_matches_timm(model):
    v = model.visual
    pos = resample_abs_pos_embed(v.pos_embed, (3, 3), num_prefix_tokens=1)
    assert torch.equal(v.resized_pos_embed(3, 3), pos)
    x = torch.randn(2, 3, 96, 96)
    patches = v.patch_embed(x).reshape(2, 9, -1)  # (B, L, D)
    seq = torch.cat([v.cls_token.expand(2, -1, -1), patches], dim=1) + pos  # (B, 1 + L, D)
    out = v.norm(v.blocks(seq))  # (B, 1 + L, D)
    assert model.cfg.vision_pool == "avg"  # the default: mean of the patch outputs
    assert torch.allclose(v(x), out[:, 1:].mean(dim=1), atol=1e-5)
    assert model.encode_image(x).shape == (2, 8)


def test_vision_pool_token_vs_avg_same_weights():
    torch.manual_seed(0)
    avg = CLIP(CFG).eval()
    tok = CLIP(replace(CFG, vision_pool="token")).eval()
    assert list(avg.state_dict()) == list(tok.state_dict())  # pooling adds or renames no weight
    tok.load_state_dict(avg.state_dict())
    x = torch.randn(3, 3, 224, 224)
    seq = avg.visual.forward_features(x)  # (B, 1 + 49, D), final norm applied to every token
    assert torch.allclose(avg.visual(x), seq[:, 1:].mean(dim=1), atol=1e-5)
    assert torch.allclose(tok.visual(x), seq[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match="vision_pool"):
        CLIPConfig(vision_pool="max")


def test_clip_config_refuses_impossible_values_and_sets_the_objectives_temperature():
    with pytest.raises(ValueError, match=r"image_std must be > 0, got \[0.5, 0.0, 0.5\]"):
        CLIPConfig(image_std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="loss must be infonce or siglip"):
        CLIPConfig(loss="hinge")
    with pytest.raises(ValueError, match="init_logit_scale and max_logit_scale must be > 0"):
        CLIPConfig(init_logit_scale=0.0)
    assert CLIPConfig().logit_scale_init == pytest.approx(1 / 0.07)
    assert CLIPConfig(loss="siglip").logit_scale_init == 10.0
    assert CLIPConfig(loss="siglip", init_logit_scale=5.0).logit_scale_init == 5.0


def test_patch_dropout_train_only():
    torch.manual_seed(0)
    m = CLIP(replace(CFG, patch_dropout=0.5))
    seen = []
    m.visual.blocks[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[1]))
    x = torch.randn(2, 3, 224, 224)
    m.train()
    m.encode_image(x)
    m.eval()
    m.encode_image(x)
    assert seen == [1 + 24, 1 + 49]  # cls + half of the 7x7 patches in training, all in eval


def test_forward_masks_caption_slots_and_scale(model):
    tok = torch.stack([_tokens([3, 4]), _tokens([5, 6], seed=1)], dim=1)  # (B=2, C=2, T)
    mask = torch.tensor([[True, False], [True, True]])
    tok[0, 1] = 0  # an empty slot: no EOT, must not be encoded
    img, txt, scale = model([torch.randn(2, 3, 224, 224)], tok, mask)
    assert img.shape == (1, 2, 8) and txt.shape == (2, 2, 8)
    assert txt[0, 1].abs().max() == 0
    assert torch.allclose(txt[1, 0], model.encode_text(tok[1, :1])[0], atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    try:
        assert model.scale().item() == pytest.approx(100.0)
        assert model.logit_scale.item() == pytest.approx(math.log(1000.0))  # param not clamped
    finally:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / 0.07))


def load_mae_encoder(model, path):
    """What the trainer does with ``--init mae_ckpt.pt``: read (shapes from the file), then load."""
    read_init(path, model.cfg).load_into(model)


def _mae_file(path, cfg=VISION, seed=3, extra=None, fmt="enko-clip/mae-encoder/v1"):
    torch.manual_seed(seed)
    state = VisionTransformer(cfg).state_dict()
    state.update(extra or {})
    torch.save({"format": fmt, "config": asdict(cfg), "model": state}, path)
    return state


def test_load_mae_encoder_exact(tmp_path):
    extra = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(4, 16),
             "decoder.blocks.0.norm1.weight": torch.ones(4)}
    state = _mae_file(tmp_path / "mae_ckpt.pt", extra=extra)
    torch.manual_seed(0)
    m = CLIP(CFG)
    text_before = {k: v.clone() for k, v in m.text.state_dict().items()}
    load_mae_encoder(m, tmp_path / "mae_ckpt.pt")
    got = m.visual.state_dict()
    assert set(got) == set(state) - set(extra)
    for k, v in got.items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(v, text_before[k]) for k, v in m.text.state_dict().items())


def test_load_mae_encoder_rejects_mismatch(tmp_path):
    m = CLIP(CFG)
    _mae_file(tmp_path / "p16.pt", replace(VISION, patch_size=16))
    with pytest.raises(ValueError) as e:
        load_mae_encoder(m, tmp_path / "p16.pt")
    msg = str(e.value)
    assert "config.patch_size: file 16, model 32" in msg
    assert "patch_embed.proj.weight: file (16, 3, 16, 16), model (16, 3, 32, 32)" in msg
    assert "pos_embed: file (1, 197, 16), model (1, 50, 16)" in msg

    _mae_file(tmp_path / "wide.pt", replace(VISION, embed_dim=32))
    with pytest.raises(ValueError) as e:
        load_mae_encoder(m, tmp_path / "wide.pt")
    msg = str(e.value)
    assert "config.embed_dim: file 32, model 16" in msg
    assert "blocks.1.mlp.fc2.weight: file (32, 128), model (16, 64)" in msg
    assert "cls_token: file (1, 1, 32), model (1, 1, 16)" in msg

    _mae_file(tmp_path / "deep.pt", replace(VISION, depth=1))
    with pytest.raises(ValueError, match=r"missing key blocks\.1\.attn\.qkv\.weight"):
        load_mae_encoder(m, tmp_path / "deep.pt")


def test_load_mae_encoder_rejects_clip_checkpoint_and_bad_format(tmp_path):
    m = CLIP(CFG)
    save_clip(m, tmp_path / "clip_ckpt.pt")
    with pytest.raises(ValueError, match="is a CLIP checkpoint"):
        load_mae_encoder(m, tmp_path / "clip_ckpt.pt")
    _mae_file(tmp_path / "other.pt", fmt="something/else")
    with pytest.raises(ValueError,
                       match="format 'something/else', expected 'enko-clip/mae-encoder/v1'"):
        load_mae_encoder(m, tmp_path / "other.pt")
    torch.save(m.visual.state_dict(), tmp_path / "raw.pt")  # a bare state dict
    with pytest.raises(ValueError, match="not an enko-clip checkpoint"):
        load_encoder_checkpoint(tmp_path / "raw.pt")  # the MAE export's reader (--init reads it as a timm ViT)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_mae_encoder(m, tmp_path / "nope.pt")


def test_save_load_clip_round_trip(tmp_path, model):
    save_clip(model, tmp_path / "clip_ckpt.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["clip_ckpt.pt"]  # no temp file left
    raw = torch.load(tmp_path / "clip_ckpt.pt", weights_only=True)
    assert raw["format"] == "enko-clip/clip/v1" and raw["config"] == asdict(CFG)
    m2 = load_clip(tmp_path / "clip_ckpt.pt")
    assert m2.cfg == CFG and not m2.training
    s1, s2 = model.state_dict(), m2.state_dict()
    assert set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    _mae_file(tmp_path / "mae_ckpt.pt")
    with pytest.raises(ValueError, match="is an MAE encoder export"):
        load_clip(tmp_path / "mae_ckpt.pt")


def test_param_groups_no_decay_exactly_biases_norms_embeddings_scale(model):
    decay, no_decay = param_groups(model, 0.2)[0]
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in no_decay["params"]}
    expected = {n for n in names.values()
                if n.endswith(".bias") or ".norm" in n or n.startswith("text.norm")
                or n in {"visual.cls_token", "visual.pos_embed", "text.pos_embed",
                         "text.token_embedding.weight", "logit_scale"}}
    assert got == expected
    assert "visual.norm.weight" in got and "text.blocks.0.norm1.weight" in got
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed.isdisjoint(got) and len(decayed) + len(got) == len(names)
    assert {"visual.patch_embed.proj.weight", "visual_proj.weight", "text_proj.weight",
            "text.blocks.1.mlp.fc2.weight", "visual.blocks.0.attn.qkv.weight"} <= decayed
    # the same rule for the MAE model: its tokens are not decayed, its fixed position tables not trained
    from mae.model import MAEConfig, MaskedAutoencoder

    mae = MaskedAutoencoder(MAEConfig(encoder=VISION, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2))
    names = {id(p): n for n, p in mae.named_parameters()}
    mae_decay, mae_no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(mae, 0.05)[0])
    assert {"mask_token", "encoder.cls_token", "decoder_norm.weight"} <= mae_no_decay
    assert {"decoder_pred.weight", "encoder.blocks.0.attn.qkv.weight"} <= mae_decay
    assert "encoder.pos_embed" not in mae_decay | mae_no_decay
