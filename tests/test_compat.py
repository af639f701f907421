"""Checkpoints written by an earlier version still load and compute what they computed then.

The fixture (``tests/fixtures/abb230d``, its README says how it was made) holds tiny models written
by commit abb230d, before the redesign moved every module: a CLIP run folder, its safetensors
export, a CLIP with a transformers text tower (``hf_text.pool: mean``, the old spelling of ``avg``),
an MAE encoder export, and what each computed from one image and two captions.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import clip
from clip.interop.init import read_init
from clip.model import CLIP, CLIPConfig
from clip.model.text import TextConfig
from mae.checkpoint import load_encoder_checkpoint
from mae.vit import VisionTransformer

OLD = Path(__file__).parent / "fixtures" / "abb230d"


@pytest.fixture(scope="module")
def expected():
    return torch.load(OLD / "expected.pt", weights_only=True)


@pytest.mark.parametrize("folder", ["clip", "clip_safetensors"])
def test_clip_checkpoint_and_export_load_and_compute_the_same(folder, expected, data_dir):
    model, preprocess = clip.load(OLD / folder)
    tok = clip.get_tokenizer(OLD / folder)
    assert model.trained_languages == (["en", "ko"] if folder == "clip" else None)  # that export did not record them
    assert tok.context_length == 24
    assert model.cfg.image_mean == (0.48145466, 0.4578275, 0.40821073)  # not saved then: the default it used
    x = preprocess(data_dir / "emoji" / "img" / "1f436.png")[None]
    assert torch.equal(x, expected["input"])  # the same pixels from the same file
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), expected["image"], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(tok(expected["texts"])), expected["text"], rtol=0, atol=1e-6)


def test_hf_text_tower_checkpoint_with_the_old_pool_name(expected):
    pytest.importorskip("transformers")
    model, _ = clip.load(OLD / "clip_hf")
    tok = clip.get_tokenizer(OLD / "clip_hf")
    assert model.cfg.hf_text.pool == "avg"  # "mean" as written then
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(expected["input"]), expected["hf_image"], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(tok(expected["texts"])), expected["hf_text"], rtol=0, atol=1e-6)


def test_mae_export_loads_as_an_encoder_and_as_init(expected):
    cfg, state = load_encoder_checkpoint(OLD / "mae_ckpt.pt")
    enc = VisionTransformer(cfg).eval()
    enc.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(expected["input"]), expected["mae_latent"], rtol=0, atol=1e-6)
    small_text = TextConfig(vocab_size=100, context_length=8, embed_dim=16, depth=1, num_heads=2)
    init = read_init(OLD / "mae_ckpt.pt", CLIPConfig(text=small_text))  # what --init does with it
    model = CLIP(init.model)
    init.load_into(model)
    assert init.model.vision == cfg and all(torch.equal(model.visual.state_dict()[k], v) for k, v in state.items())
