"""Pretrained towers of Parallel Multilingual CLIP: a transformers text encoder (a tiny random
XLM-R built here, saved to a temporary folder) as CLIP's text tower, trained through the real
entry point (one process: ZeRO-2, bf16 autocast, multi-crop, parallel en + ko captions, both
towers frozen for 3 steps), reloaded from ``clip_ckpt.pt`` without its folder and evaluated by
``python -m clip.eval``; and timm ViT state dicts as ``--init``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tiny import save_tiny_xlmr

ROOT = Path(__file__).resolve().parents[1]
FREEZE = 3
STEPS = 50


def _rows(n: int = 64) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "data" / "emoji" / "captions.jsonl").read_text(encoding="utf-8")
            .splitlines()][::25][:n]
    return [{**r, "file": str(ROOT / "data" / "emoji" / r["file"])} for r in rows]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    from launch.runtime.config import load_config
    from launch.stages.mae import MAERunConfig
    from mae.model import MaskedAutoencoder
    from mae.checkpoint import save_encoder_checkpoint

    root = tmp_path_factory.mktemp("hf")
    xlmr = save_tiny_xlmr(root / "xlmr")
    torch.manual_seed(0)
    save_encoder_checkpoint(MaskedAutoencoder(load_config(MAERunConfig, str(ROOT / "configs" / "mae_tiny.yaml")).model),
                            root / "mae_ckpt.pt")
    manifest = root / "m.jsonl"  # 64 emoji trained on for 12 epochs: the loss must fall far below chance
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()), encoding="utf-8")
    out = root / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "clip.py"), "--init", str(root / "mae_ckpt.pt"),
           "--config", str(ROOT / "configs" / "clip_tiny.yaml"), f"run.out_dir={out}", "model.text_tower=hf",
           f"model.hf_text.path={xlmr}", "model.hf_text.pool=avg", f"data.source={manifest}", "data.val_fraction=0",
           "train.zero_stage=2", "train.precision=bf16", f"freeze.image_steps={FREEZE}", f"freeze.text_steps={FREEZE}",
           f"run.ckpt_every={FREEZE}", "run.keep_last=0", f"train.steps={STEPS}", "train.micro_batch_size=16",
           "train.warmup_steps=3", "train.lr=2e-3", "val_every=0", "train.num_workers=0", "run.log_every=1",
           "guard.chance_logs=0"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return {"root": root, "xlmr": xlmr, "out": out, "manifest": manifest}


def _module(out: Path, step: int) -> dict:  # DeepSpeed's own checkpoint file (pickled by DeepSpeed itself)
    f = out / "checkpoints" / f"step_{step:07d}" / "mp_rank_00_model_states.pt"
    return torch.load(f, weights_only=False, map_location="cpu")["module"]


def test_hf_text_tower_trains(hf_run):
    losses = [json.loads(line)["train/loss"] for line in (hf_run["out"] / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # chance: 0.5 (ln 32 + ln 16) = 3.12; measured: mean of the first 5 losses 3.43, of the last 5 1.74
    assert last < first - 1.0, (first, last)


def test_freeze_window_keeps_both_pretrained_towers(hf_run):
    from safetensors.torch import load_file

    hf = load_file(str(hf_run["xlmr"] / "model.safetensors"))
    mae = torch.load(hf_run["root"] / "mae_ckpt.pt", weights_only=True)["model"]
    at_freeze, later = _module(hf_run["out"], FREEZE), _module(hf_run["out"], 2 * FREEZE)
    text_keys = [k for k in at_freeze if k.startswith("text.model.")]
    assert len(text_keys) == len([k for k in hf if not k.startswith("pooler.")]) > 20  # no pooler: it would get no gradient
    for k in text_keys:
        assert torch.equal(at_freeze[k], hf[k[len("text.model."):]]), f"{k} moved inside the freeze window"
    for k, v in mae.items():
        assert torch.equal(at_freeze["visual." + k], v), f"visual.{k} moved inside the freeze window"
    moved = sum(not torch.equal(later[k], at_freeze[k]) for k in text_keys)
    assert moved >= len(text_keys) // 2, f"only {moved} of {len(text_keys)} text tensors trained after the window"
    assert not torch.equal(later["text_proj.weight"], at_freeze["text_proj.weight"])


def test_checkpoint_records_the_tower_and_reloads_without_its_folder(hf_run, tmp_path):
    from clip.model.hf_text import HFTextTower
    from clip.model.tokens import HFTokenizer
    from clip.model import load_clip

    ckpt = torch.load(hf_run["out"] / "clip_ckpt.pt", weights_only=True)
    assert ckpt["config"]["text_tower"] == "hf" and ckpt["languages"] == ["en", "ko"]
    assert json.loads(ckpt["hf_text_config"])["model_type"] == "xlm-roberta"
    moved = tmp_path / "gone"
    shutil.move(str(hf_run["xlmr"]), moved)  # loading must not need the original folder
    try:
        model = load_clip(hf_run["out"] / "clip_ckpt.pt")
    finally:
        shutil.move(str(moved), hf_run["xlmr"])
    assert isinstance(model.text, HFTextTower) and model.trained_languages == ["en", "ko"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    tok = HFTokenizer.from_dir(hf_run["out"] / "tokenizer", context_length=model.cfg.text.context_length)
    assert not (hf_run["out"] / "tokenizer" / "model.safetensors").exists()  # the tokenizer only
    ids = tok.encode_batch(["grinning face", "활짝 웃는 얼굴", ""])
    assert ids.shape == (3, model.cfg.text.context_length) and (ids[:, 0] == tok.sot_id).all()
    feats = model.encode_text(ids)
    assert feats.shape == (3, model.cfg.embed_dim) and torch.allclose(feats.norm(dim=-1), torch.ones(3))
    # mean pooling ignores padding: the same caption padded to another length gives the same feature
    short = tok.encode_batch(["grinning face"], context_length=12)
    assert torch.allclose(model.encode_text(short), feats[:1], atol=1e-5)


def test_eval_cli_on_the_hf_run(hf_run, tmp_path, capsys):
    from clip.eval import main

    assert main(["retrieval", "--checkpoint", str(hf_run["out"]), "--manifest", str(hf_run["manifest"]),
                 "--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "metrics_retrieval.json").read_text(encoding="utf-8"))
    assert res["n_images"] == 64
    for lang in ("en", "ko"):
        sec = res["languages"][lang]
        assert sec["n_texts"] == 64 and sec["seen_in_training"] is True
        # the 64 training images themselves: far above chance (1/64) after 12 epochs
        assert sec["text_to_image_R@5"] > 0.3, (lang, sec["text_to_image_R@5"])
    print(capsys.readouterr().out)


# ----------------------------------------------------------------------------- timm ViT as --init

def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    return TimmViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10, **kw)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_state_dict_initialises_the_image_tower(tmp_path, suffix):
    from clip.interop.init import read_init
    from clip.model import CLIP, CLIPConfig
    from mae.vit import ViTConfig

    theirs = _timm_vit(pre_norm=True).eval()  # CLIP-style: ln_pre, no patch bias, a 10-way head
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(theirs.state_dict(), str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    init = read_init(path, CLIPConfig(vision=ViTConfig(num_heads=2)))
    assert init.what == "timm ViT" and "head.weight" not in init.state
    cfg = init.model.vision
    assert cfg == ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, pre_norm=True)
    model = CLIP(CLIPConfig(vision=cfg)).eval()
    init.load_into(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.visual.forward_features(x), theirs.forward_features(x))


def test_timm_init_mismatch_is_one_config_error(tmp_path, tiny_tokenizer_dir):
    from launch.runtime.config import ConfigError, load_config
    from launch.stages.clip import CLIPRunConfig, resolve

    cfg = load_config(CLIPRunConfig, str(ROOT / "configs" / "clip_tiny.yaml"), [f"data.tokenizer={tiny_tokenizer_dir}"])
    odd = _timm_vit(qk_norm=True, fc_norm=True, global_pool="avg")  # query/key norms, a new fc_norm
    torch.save(odd.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(ConfigError) as e:
        resolve(cfg, str(tmp_path / "odd.pt"))
    msg = str(e.value)
    assert "\n" not in msg and "timm ViT does not match" in msg and "attn.q_norm" in msg and "fc_norm" in msg
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pt")
    with pytest.raises(ConfigError, match="not a timm ViT state dict"):
        resolve(cfg, str(tmp_path / "resnet.pt"))
