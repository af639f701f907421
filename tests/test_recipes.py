"""The fine-tuning recipe of the CLIP stage: layer-wise lr decay with MAE's grouping, freeze windows
with unlocked last blocks, re-warming after a window, the weight average, the sigmoid objective."""
from __future__ import annotations

import pytest
import torch

from clip.model import CLIP, CLIPConfig
from clip.model.text import TextConfig
from launch.runtime.config import EMAConfig, TrainConfig
from launch.runtime.ema import EMA
from launch.runtime.optim import FreezeSchedule, LRSchedule, layer_decay, param_groups
from mae.vit import ViTConfig

CFG = CLIPConfig(vision=ViTConfig(img_size=32, patch_size=16, embed_dim=16, depth=3, num_heads=2),
                 text=TextConfig(vocab_size=50, context_length=8, embed_dim=16, depth=2, num_heads=2), embed_dim=8)


def lr_of_each_parameter(model, groups, schedule, step: int) -> dict[str, float]:
    lrs = schedule.lrs(step)
    by_id = {id(p): lr for g, lr in zip(groups, lrs) for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_layer_decay_gives_maes_per_parameter_rates():
    """MAE's fine-tuning rule (``param_groups_lrd``): a parameter of layer i of a tower of L blocks
    gets lr x decay ** (L + 1 - i), embeddings are layer 0, block k is layer k + 1, and the final
    norm, the projections and the temperature train at the full rate."""
    model = CLIP(CFG)
    train = TrainConfig(lr=1e-3, steps=10, warmup_steps=0, layer_decay=0.75)
    groups, specs = param_groups(model, 0.1, lr_scale=layer_decay(model, train.layer_decay))
    lrs = lr_of_each_parameter(model, groups, LRSchedule(train, 1, specs), 0)
    peak = 1e-3
    expect = {"visual.patch_embed.proj.weight": 0.75 ** 4, "visual.pos_embed": 0.75 ** 4, "visual.cls_token": 0.75 ** 4,
              "visual.blocks.0.attn.qkv.weight": 0.75 ** 3, "visual.blocks.2.mlp.fc2.bias": 0.75 ** 1,
              "visual.norm.weight": 1.0, "text.token_embedding.weight": 0.75 ** 3, "text.pos_embed": 0.75 ** 3,
              "text.blocks.0.norm1.weight": 0.75 ** 2, "text.blocks.1.attn.proj.weight": 0.75, "text.norm.bias": 1.0,
              "visual_proj.weight": 1.0, "text_proj.weight": 1.0, "logit_scale": 1.0}
    for name, scale in expect.items():
        assert lrs[name] == pytest.approx(peak * scale), name
    assert len(lrs) == len(list(model.parameters()))  # every parameter has its rate
    groups, specs = param_groups(model, 0.1, lr_scale=layer_decay(model, 1.0))
    assert {s for _, s in specs} == {1.0}  # 1 = off


def test_unlocked_last_blocks_train_during_the_freeze_window():
    model = CLIP(CFG)
    freeze = FreezeSchedule(model, {"visual.": 5, "text.": 5}, unlocked={"visual.": 1, "text.": 2})
    frozen = {n for n, p in model.named_parameters() if freeze.steps_of(p) == 5}
    assert "visual.blocks.1.attn.qkv.weight" in frozen and "visual.pos_embed" in frozen
    assert not any(n.startswith(("visual.blocks.2.", "visual.norm.")) for n in frozen)  # the last block, the norm
    assert {n for n in frozen if n.startswith("text.")} == {"text.token_embedding.weight", "text.pos_embed"}
    freeze.apply(0)
    assert not model.visual.blocks[1].attn.qkv.weight.requires_grad and model.visual.blocks[2].attn.qkv.weight.requires_grad


def test_a_group_leaving_its_window_rewarms_linearly_from_zero():
    train = TrainConfig(lr=1e-3, steps=100, warmup_steps=2)
    sched = LRSchedule(train, 1, [(10, 1.0), (0, 1.0)], rewarm=4)
    lrs = [sched.lrs(s)[0] for s in range(8, 16)]
    base = [sched.lrs(s)[1] for s in range(8, 16)]  # the group that never froze
    assert lrs[:2] == [0.0, 0.0]
    for j, (lr, b) in enumerate(zip(lrs[2:6], base[2:6])):
        assert lr == pytest.approx(b * (j + 1) / 4)  # 1/4, 2/4, 3/4, 4/4 of the schedule's rate
    assert lrs[6:] == base[6:]
    assert sched.unfreezing(10) == [0] and sched.unfreezing(11) == [] and sched.unfreezing(0) == []
    assert LRSchedule(train, 1, [(10, 1.0)]).lrs(10) == [pytest.approx(1e-3 * LRSchedule(train, 1).factor(10))]


def test_weight_average_follows_its_rule_and_swaps_in_and_out():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, EMAConfig(decay=0.5, start_step=2, every=1))
    w = [model.weight.detach().clone()]
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.add_(1.0)
        w.append(model.weight.detach().clone())
        ema.update(step)
    # steps 1-2 copy the weights, steps 3-4 average: e3 = (w2 + w3) / 2, e4 = (e3 + w4) / 2
    want = ((w[2] + w[3]) / 2 + w[4]) / 2
    assert torch.equal(ema.shadow["weight"], want)
    with ema.swapped():
        assert torch.equal(model.weight, want)
    assert torch.equal(model.weight, w[4])
    again = EMA(model, EMAConfig(decay=0.5))
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow["weight"], want)


def test_sigmoid_model_has_the_siglip_init_and_exports_its_bias(tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("open_clip")
    import open_clip

    from clip.interop.export import export_open_clip
    from tokenizer import BilingualTokenizer

    tok = BilingualTokenizer.from_dir(tiny_tokenizer_dir)
    cfg = CLIPConfig(vision=CFG.vision, text=TextConfig(vocab_size=tok.vocab_size, context_length=16, embed_dim=16, depth=1,
                                                        num_heads=2, eot_id=tok.eot_id, pad_id=tok.pad_id),
                     embed_dim=8, loss="siglip")
    model = CLIP(cfg).eval()
    assert model.logit_scale.exp().item() == pytest.approx(10.0) and model.logit_bias.item() == -10.0
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
    export_open_clip(model, tok, tmp_path / "oc")
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert theirs.logit_bias.item() == pytest.approx(-3.5) and theirs.logit_scale.exp().item() == pytest.approx(10.0)
    x = torch.randn(2, 3, 32, 32)
    ids = tok(["a dog", "개"], context_length=16)
    with torch.no_grad():
        assert torch.allclose(theirs.encode_image(x, normalize=True), model.encode_image(x), atol=1e-5)
        assert torch.allclose(theirs.encode_text(ids, normalize=True), model.encode_text(ids), atol=1e-5)


@pytest.mark.slow
def test_released_towers_rewarm_without_a_loss_shock():
    """A transformers text tower and a timm ViT (trained briefly first, so that they are pretrained
    for these captions), both frozen for 20 steps, bf16, ZeRO-2, at a high peak lr: with a re-warm
    over 10 steps the loss after the release never rises more than 10 % above its level before
    (without one it jumps by a third: bench/rewarm.py, README)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from rewarm import measure

    r = measure(window=20, after=10, rewarms=[10], pretrain=100, lr=5e-3, batch=32)[10]
    assert r["highest"] <= 1.1 * r["before"], (r["before"], r["highest"])
