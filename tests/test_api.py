"""clip.api: the README's Python example run as written, the tokenizer at the model's context
length, the user preprocess against the training loader for every PIL mode, open_clip's call
conventions, and the safetensors folders (CLIP and MAE encoder) against the .pt checkpoints."""
from __future__ import annotations

import contextlib
import io
import re
import shutil

import pytest
import torch
from PIL import Image

import clip
from clip.model import load_clip, save_clip
from mae.images.decode import load_rgb
from mae.images.transforms import eval_transform
from mae.vit import ViTConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_tiny_clip_run):
    """A run folder like the demo's: context length 32 (the tokenizer's own default is 77)."""
    return make_tiny_clip_run(tmp_path_factory.mktemp("api") / "run", patch_size=16, embed_dim=16)


def test_readme_python_example_runs(run, repo_root, monkeypatch):
    text = (repo_root / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- test:python-api -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 14 and "runs/demo/clip" in code
    monkeypatch.chdir(repo_root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace("runs/demo/clip", str(run)), "README.md", "exec"), {})
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2 and "'a dog'" in lines[0] and "'개'" in lines[1]
    for line in lines:  # probabilities over the three labels of each language
        assert sum(float(x) for x in re.findall(r": ([0-9.e-]+)", line)) == pytest.approx(1.0, abs=2e-3)


def test_get_tokenizer_uses_the_models_context_length(run, tmp_path):
    model, _ = clip.load(run)
    tok = clip.get_tokenizer(run)
    ids = tok(["a dog", "강아지 얼굴"])
    assert ids.shape == (2, 32) and tok(["a dog"], context_length=8).shape == (1, 8)
    assert model.encode_text(ids).shape == (2, 16)
    # a checkpoint trained with another tokenizer is refused, with both fingerprints named
    other = tmp_path / "other"
    shutil.copytree(run, other)
    save_clip(model, other / "clip_ckpt.pt", tokenizer="0123456789abcdef")
    with pytest.raises(ValueError, match="0123456789abcdef"):
        clip.get_tokenizer(other)
    with pytest.raises(ValueError, match="0123456789abcdef"):
        clip.load(other)
    with pytest.raises(FileNotFoundError, match="no CLIP checkpoint"):
        clip.load(tmp_path)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "L", "CMYK", "RGB", "I;16"])
def test_preprocess_gives_the_training_pixels_for_every_mode(run, data_dir, tmp_path, mode):
    _, preprocess = clip.load(run)
    src = Image.open(data_dir / "emoji" / "img" / "1f436.png")  # palette with a transparent index
    assert src.mode == "P" and "transparency" in src.info
    img = src if mode == "P" else src.convert("RGBA").convert(mode) if mode != "I;16" else src.convert("L").convert("I;16")
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    reference = eval_transform(64)(load_rgb(path))  # exactly what training and clip.eval feed the model
    with Image.open(path) as opened:
        assert opened.mode == mode
        got = preprocess(opened)
    assert got.shape == (3, 64, 64) and torch.equal(got, reference)
    assert torch.equal(preprocess(str(path)), reference)
    if mode in ("P", "RGBA", "LA"):  # the bug this fixes: without the loader's conversion the pixels differ
        if mode == "P":  # RGBA / LA fail loudly there (4 / 2 channels against 3 means)
            assert not torch.equal(eval_transform(64)(Image.open(path)), reference)
        assert not torch.equal(eval_transform(64)(Image.open(path).convert("RGB")), reference)  # alpha not flattened


def test_open_clip_call_conventions(run):
    model, _ = clip.load(run)
    model2, train_tf, val_tf = clip.create_model_and_transforms(run)
    tok = clip.get_tokenizer(run)
    x = torch.randn(3, 3, 64, 64)
    ids = tok(["a dog", "a cat", "개", "고양이"])
    with torch.no_grad():
        img, txt, scale = model(x, ids)
        raw = model.encode_image(x, normalize=False)
        assert img.shape == (3, 16) and txt.shape == (4, 16)
        assert torch.allclose(img, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-6)
        assert scale.item() == pytest.approx(model.logit_scale.exp().item()) and scale.item() == pytest.approx(1 / 0.07)
        assert model(None, ids)[0] is None and model(x, None)[1] is None
        assert torch.equal(model2.encode_image(x), model.encode_image(x))
        assert torch.equal(val_tf(Image.new("P", (80, 70))), clip.load(run)[1](Image.new("P", (80, 70))))
    assert train_tf(Image.new("LA", (80, 70))).shape == (3, 64, 64)


def test_safetensors_exports_match_the_pt_checkpoints(run, tmp_path):
    import timm
    from safetensors.torch import load_file

    from clip.export import main as export_main
    from mae.model import MAEConfig, MaskedAutoencoder
    from mae.checkpoint import load_encoder_checkpoint, save_encoder_checkpoint

    assert export_main(["--checkpoint", str(run), "--format", "safetensors", "--out", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    ref, loaded = load_clip(run / "clip_ckpt.pt"), clip.load(tmp_path / "c")[0]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert clip.get_tokenizer(tmp_path / "c")(["a"]).shape == (1, 32)

    torch.manual_seed(0)
    cfg = MAEConfig(encoder=ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2),
                    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    save_encoder_checkpoint(MaskedAutoencoder(cfg), tmp_path / "mae_ckpt.pt")
    assert export_main(["--checkpoint", str(tmp_path / "mae_ckpt.pt"), "--format", "safetensors",
                        "--out", str(tmp_path / "m")]) == 0
    (c1, s1), (c2, s2) = load_encoder_checkpoint(tmp_path / "mae_ckpt.pt"), load_encoder_checkpoint(tmp_path / "m")
    assert c1 == c2 and all(torch.equal(s1[k], s2[k]) for k in s1) and s1.keys() == s2.keys()
    vit = timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=1,
                                                           num_heads=2, num_classes=0)
    vit.load_state_dict(load_file(tmp_path / "m" / "model.safetensors"), strict=True)  # timm's names
    assert export_main(["--checkpoint", str(tmp_path / "mae_ckpt.pt"), "--format", "open_clip",
                        "--out", str(tmp_path / "x")]) == 2
