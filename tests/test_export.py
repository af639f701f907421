"""clip.interop.export to open_clip (loaded by open_clip with no code of ours: embeddings to 1e-5 in fp32,
English and Korean, and the same token ids), CLIP_benchmark on the export against clip.eval
(identical recall), and the OpenAI-layout import (open_clip's ViT-B-32 layout, GELU and QuickGELU,
shrunk) against open_clip's own forward, with its errors."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clip.model import CLIP, CLIPConfig, save_clip  # noqa: E402
from clip.model.text import TextConfig  # noqa: E402
from mae.vit import ViTConfig  # noqa: E402

TEXTS = ["a red heart", "dog face", "  Grinning   FACE with big eyes ", "빨간 하트", "강아지 얼굴",
         "웃는 얼굴 " * 12]  # the last one is cut at the context length, EOT kept


def _run(root, tok_dir, vision: ViTConfig, pool="avg", act="gelu", seed=0):
    """A run folder holding a random CLIP whose biases and norms are perturbed (so a missing bias or
    a LayerNorm mapped wrongly shows in the embeddings)."""
    from tokenizer import BilingualTokenizer

    tok = BilingualTokenizer.from_dir(tok_dir)
    torch.manual_seed(seed)
    text = TextConfig(vocab_size=tok.vocab_size, context_length=32, embed_dim=32, depth=2, num_heads=2,
                      eot_id=tok.eot_id, pad_id=tok.pad_id, act_layer=act)
    model = CLIP(CLIPConfig(vision=vision, text=text, embed_dim=16, vision_pool=pool)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    shutil.copytree(tok_dir, root / "tokenizer")
    save_clip(model, root / "clip_ckpt.pt", tokenizer=tok.fingerprint)
    return model, tok


def _max_diffs(ours, theirs, tok, oc_tok, size):
    ids = tok.encode_batch(TEXTS, context_length=ours.cfg.text.context_length)
    assert torch.equal(oc_tok(TEXTS), ids)  # open_clip's tokenizer (HF AutoTokenizer) gives our ids
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img = (theirs.encode_image(x) - ours.encode_image(x, normalize=False)).abs().max().item()
        en = (theirs.encode_text(ids[:3]) - ours.encode_text(ids[:3], normalize=False)).abs().max().item()
        ko = (theirs.encode_text(ids[3:]) - ours.encode_text(ids[3:], normalize=False)).abs().max().item()
        assert theirs.logit_scale.exp().item() == pytest.approx(ours.scale().item())
    return img, en, ko


@pytest.mark.parametrize("variant", ["avg_gelu", "token_prenorm_quickgelu"])
def test_open_clip_export_native_tower_same_embeddings(tmp_path, tiny_tokenizer_dir, variant):
    from clip.export import main as export_main

    vision = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    pool, act = "avg", "gelu"
    if variant != "avg_gelu":  # OpenAI's layout: ln_pre (no patch bias), eps 1e-5, QuickGELU, cls pooling
        vision = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, pre_norm=True,
                           norm_eps=1e-5, act_layer="quick_gelu")
        pool, act = "token", "quick_gelu"
    ours, tok = _run(tmp_path / "run", tiny_tokenizer_dir, vision, pool, act)
    out = tmp_path / "oc"
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--format", "open_clip", "--out", str(out)]) == 0
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert type(theirs.visual).__name__ == "VisionTransformer"
    img, en, ko = _max_diffs(ours, theirs.eval(), tok, open_clip.get_tokenizer(f"local-dir:{out}"), 64)
    print(f"export native {variant}: max abs diff image {img:.2e}, text en {en:.2e}, ko {ko:.2e}")
    assert max(img, en, ko) <= 1e-5
    assert {p.name for p in out.iterdir()} >= {"open_clip_config.json", "open_clip_model.safetensors",
                                              "enko-clip.json", "tokenizer.json", "tokenizer_config.json"}


def test_open_clip_export_timm_tower_vit_b32_by_name(tmp_path, tiny_tokenizer_dir):
    """Our ViT-B/32 is timm's vit_base_patch32_224: open_clip's timm tower, weights unchanged; loaded
    the open_clip way, by name + pretrained=PATH."""
    from clip.interop.export import export

    ours, tok = _run(tmp_path / "run", tiny_tokenizer_dir, ViTConfig())
    out = export(str(tmp_path / "run"), "open_clip", str(tmp_path / "oc"), name="enko-clip-b32")
    cfg = json.loads((out / "enko-clip-b32.json").read_text())
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch32_224" and cfg["vision_cfg"]["timm_pool"] == "avg"
    open_clip.add_model_config(out / "enko-clip-b32.json")
    theirs, _, _ = open_clip.create_model_and_transforms("enko-clip-b32",
                                                         pretrained=str(out / "open_clip_model.safetensors"))
    img, en, ko = _max_diffs(ours, theirs.eval(), tok, open_clip.get_tokenizer("enko-clip-b32"), 224)
    print(f"export timm ViT-B/32: max abs diff image {img:.2e}, text en {en:.2e}, ko {ko:.2e}")
    assert max(img, en, ko) <= 1e-5


def test_clip_benchmark_recall_equals_clip_eval(tmp_path, tiny_tokenizer_dir, data_dir, monkeypatch):
    """CLIP_benchmark's open_clip model type on an XM3600-layout fixture of bundled emoji, against
    ``python -m clip.eval retrieval`` on the same images and captions: identical R@1/5/10."""
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.cli import main as cb_main

    from clip.eval import main as eval_main
    from clip.interop.export import export
    from mae.images.decode import load_rgb

    vision = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    _run(tmp_path / "run", tiny_tokenizer_dir, vision)
    out = export(str(tmp_path / "run"), "open_clip", str(tmp_path / "oc"))
    rows = [json.loads(line) for line in open(data_dir / "emoji" / "captions.jsonl", encoding="utf-8")][::40]
    root = tmp_path / "xm3600"
    (root / "images").mkdir(parents=True)
    manifest = []
    for r in rows:  # RGB at the model's size: both pipelines then resize nothing (see README)
        path = root / "images" / f"{r['key']}.png"
        load_rgb(data_dir / "emoji" / r["file"]).resize((64, 64)).save(path)
        manifest.append({"file": f"images/{path.name}", "key": r["key"], "en": r["en"], "ko": r["ko"]})
    for lang in ("en", "ko"):
        ann = {"image_paths": [str(root / m["file"]) for m in manifest], "annotations": [m[lang] for m in manifest]}
        (root / f"crossmodal3600_captions-{lang}.json").write_text(json.dumps(ann, ensure_ascii=False), encoding="utf-8")
    (root / "m.jsonl").write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in manifest), encoding="utf-8")

    assert eval_main(["retrieval", "--checkpoint", str(tmp_path / "run"), "--data", str(root / "m.jsonl"),
                      "--out", str(tmp_path / "ev"), "--no-progress", "--device", "cpu"]) == 0
    ours = json.loads((tmp_path / "ev" / "metrics_retrieval.json").read_text())["languages"]
    for lang in ("en", "ko"):
        result = tmp_path / f"cb_{lang}.json"
        monkeypatch.setattr(sys, "argv", [
            "clip_benchmark", "eval", "--dataset", "crossmodal3600", "--dataset_root", str(root), "--language", lang,
            "--task", "zeroshot_retrieval", "--model_type", "open_clip", "--model", f"local-dir:{out}",
            "--pretrained", "", "--recall_k", "1", "5", "10", "--no_amp", "--batch_size", "16", "--num_workers", "0",
            "--output", str(result)])
        cb_main()  # the `clip_benchmark` console script, in this process
        theirs = json.loads(result.read_text())["metrics"]
        mine = ours[lang]
        n = len(manifest)  # one caption per image and language: n queries each way
        for k in (1, 5, 10):  # the same hits (CLIP_benchmark's figures are float32 means)
            for cb, ev in ((f"image_retrieval_recall@{k}", f"text_to_image_R@{k}"),
                           (f"text_retrieval_recall@{k}", f"image_to_text_R@{k}")):
                assert round(theirs[cb] * n) == round(mine[ev] * n) and abs(theirs[cb] - mine[ev]) < 1e-7, (cb, theirs, mine)
        assert 0 < mine["text_to_image_R@10"] < 1  # neither trivial nor empty
        print(f"CLIP_benchmark {lang} ({len(manifest)} images):",
              {k: round(v, 4) for k, v in theirs.items() if "recall" in k},
              "clip.eval:", {k: round(v, 4) for k, v in mine.items() if "_R@" in k})


def test_export_errors_are_one_line(tmp_path, capsys, tiny_tokenizer_dir):
    from clip.export import main as export_main

    assert export_main(["--checkpoint", str(tmp_path / "nowhere"), "--format", "open_clip", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
    vision = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, act_layer="quick_gelu")
    _run(tmp_path / "run", tiny_tokenizer_dir, vision)  # QuickGELU image tower, GELU text tower
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--format", "open_clip", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one activation for both towers" in err[0]


# ----------------------------------------------------------------------------- OpenAI-layout import

def _open_clip_vit_b32(tmp_path, quick_gelu: bool, vocab_size: int = 2000):
    """open_clip's ViT-B-32 config (its layout: ln_pre, class token, QuickGELU or GELU, eps 1e-5),
    shrunk in width and depth; random weights with perturbed biases and norms."""
    cfg = json.loads((open_clip.factory._MODEL_CONFIG_PATHS[0] / "ViT-B-32.json").read_text())
    cfg["vision_cfg"].update(layers=2, width=128, image_size=64)
    cfg["text_cfg"].update(layers=2, width=128, heads=2, vocab_size=vocab_size, context_length=32)
    cfg.update(embed_dim=64, quick_gelu=quick_gelu)
    name = f"tiny-ViT-B-32{'-quickgelu' if quick_gelu else ''}"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bias" in n or "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def load_openai_clip(path, act: str = "quick_gelu", text: TextConfig | None = None) -> CLIP:
    """What ``--init weights.pt`` loads: the OpenAI-layout file read (sizes from the tensors, the
    vocabulary the tokenizer's: here the file's own) into a CLIP with activation ``act``."""
    from dataclasses import replace

    from clip.interop.init import read_init
    from mae.common.files import read_state_dict
    from mae.vit import ViTConfig

    embedding = read_state_dict(path).get("token_embedding.weight")
    text = replace(text or TextConfig(), act_layer=act)
    text = replace(text, vocab_size=embedding.shape[0]) if embedding is not None else text
    init = read_init(path, CLIPConfig(vision=ViTConfig(act_layer=act), text=text))
    model = CLIP(init.model)
    init.load_into(model)
    return model.eval()


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_import_open_clip_vit_b32_layout_same_embeddings(tmp_path, tiny_tokenizer_dir, quick_gelu):
    from safetensors.torch import save_file

    from tokenizer import BilingualTokenizer

    ref = _open_clip_vit_b32(tmp_path, quick_gelu)
    tok = BilingualTokenizer.from_dir(tiny_tokenizer_dir)  # EOT is not the largest id: pooled at EOT anyway
    text = TextConfig(eot_id=tok.eot_id, pad_id=tok.pad_id)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    act = "quick_gelu" if quick_gelu else "gelu"
    ids = tok.encode_batch(TEXTS, context_length=32)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        ours = load_openai_clip(path, act, text)
        assert ours.cfg.vision.pre_norm and ours.cfg.vision_pool == "token" and ours.cfg.vision.num_heads == 2
        with torch.no_grad():
            img = (ref.encode_image(x) - ours.encode_image(x, normalize=False)).abs().max().item()
            # open_clip pools at argmax(ids) (OpenAI's EOT is the largest id); with our ids EOT is not,
            # so its text features are compared at the EOT position explicitly
            feats = ref.ln_final(ref.transformer(ref.token_embedding(ids) + ref.positional_embedding,
                                                 attn_mask=ref.attn_mask))
            eot = (ids == tok.eot_id).int().argmax(dim=1)
            want = feats[torch.arange(len(ids)), eot] @ ref.text_projection
            got = ours.encode_text(ids, normalize=False)
            en, ko = ((want - got)[:3].abs().max().item(), (want - got)[3:].abs().max().item())
        print(f"import open_clip ViT-B-32{'-quickgelu' if quick_gelu else ''} ({path.suffix}): "
              f"max abs diff image {img:.2e}, text en {en:.2e}, ko {ko:.2e}")
        assert max(img, en, ko) <= 1e-5
        assert ours.scale().item() == pytest.approx(ref.logit_scale.exp().item())
    # the other activation gives other embeddings: the setting matters and is not guessed
    other = load_openai_clip(tmp_path / "w.pt", "gelu" if quick_gelu else "quick_gelu", text)
    with torch.no_grad():
        assert (ref.encode_image(x) - other.encode_image(x, normalize=False)).abs().max() > 1e-3


def test_import_errors_are_one_line(tmp_path):

    ref = _open_clip_vit_b32(tmp_path, True)
    state = ref.state_dict()
    torch.save({**state, "logit_bias": torch.zeros(())}, tmp_path / "siglip.pt")
    bad = dict(state)
    bad["visual.proj"] = bad["visual.proj"][:, :32]
    torch.save(bad, tmp_path / "bad.pt")
    torch.save({k: v for k, v in state.items() if k != "visual.ln_pre.weight"}, tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    for path, expected in [("siglip.pt", "outside OpenAI CLIP's layout"), ("bad.pt", "disagree on the joint width"),
                           ("missing.pt", "missing key visual.norm_pre.weight"), ("other.pt", "not OpenAI CLIP's layout")]:
        with pytest.raises(ValueError, match=expected) as e:
            load_openai_clip(tmp_path / path)
        assert "\n" not in str(e.value)


def test_init_from_openai_layout_with_an_hf_tokenizer(tmp_path, data_dir, capsys):
    """KELIP's case: OpenAI-layout weights + an HF BPE with [PAD] and <s> / </s>, imported with explicit
    SOT / EOT / PAD; ``--init`` resolves the run to the checkpoint's towers and loads them exactly."""
    from dataclasses import replace

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from launch.runtime.config import ConfigError, load_config
    from launch.stages.clip import CLIPRunConfig, resolve
    from tokenizer import BilingualTokenizer
    from tokenizer.hf_import import main as import_main

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    lines = [line for f in ("en.txt", "ko.txt") for line in open(data_dir / "corpus" / f, encoding="utf-8")][::8]
    hf.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<s>", "[PAD]", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    argv = ["--hf", str(tmp_path / "hf"), "--sot", "<s>", "--eot", "</s>", "--out", str(tmp_path / "tok")]
    assert import_main(argv + ["--pad", "<pad>"]) == 2 and "no token '<pad>'" in capsys.readouterr().err
    assert import_main(argv + ["--pad", "[PAD]"]) == 0
    tok = BilingualTokenizer.from_dir(tmp_path / "tok")
    assert (tok.sot_id, tok.pad_id, tok.eot_id) == (0, 1, 2)
    ids = hf.encode("a dog").ids
    assert tok(["a dog"], context_length=8)[0].tolist() == [0, *ids, 2] + [1] * (6 - len(ids))  # [SOT] .. [EOT] [PAD]..

    ref = _open_clip_vit_b32(tmp_path, True, tok.vocab_size)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    cfg = load_config(CLIPRunConfig, str(data_dir.parent / "configs" / "clip_tiny.yaml"))
    quick = replace(cfg.model, vision=replace(cfg.model.vision, act_layer="quick_gelu"),
                    text=replace(cfg.model.text, act_layer="quick_gelu"))
    cfg = replace(cfg, model=quick, data=replace(cfg.data, tokenizer=str(tmp_path / "tok")))
    run = resolve(cfg, str(tmp_path / "w.pt"))
    resolved, init = run.cfg, run.init
    assert init.target == "clip" and resolved.model.vision_pool == "token" and resolved.model.vision.pre_norm
    assert (resolved.model.text.eot_id, resolved.model.text.pad_id, resolved.model.text.context_length) == (2, 1, 32)
    model = CLIP(resolved.model).eval()
    init.load_into(model)  # what launch/stages/clip.py's main does with it
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ref.encode_image(x) - model.encode_image(x, normalize=False)).abs().max() <= 1e-5
    other = BilingualTokenizer.from_hf(tmp_path / "hf", "<s>", "</s>", "[PAD]")
    other._tokenizer.add_tokens(["extra-token"])
    other.vocab_size += 1
    other.save(tmp_path / "tok2")
    with pytest.raises(ConfigError, match="token_embedding has .* rows but the tokenizer has"):
        resolve(replace(cfg, data=replace(cfg.data, tokenizer=str(tmp_path / "tok2"))), str(tmp_path / "w.pt"))
