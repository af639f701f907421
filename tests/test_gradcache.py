"""Feature-cached accumulation: k micro-batches give the gradients of one step over the whole
batch (multi-crop, parallel captions with masked slots, patch dropout), on 1 and on 2 ranks, with
InfoNCE, the sigmoid loss (its bias passed and trained, every exchange) and a distillation term."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip.model.loss import ClipLoss
from clip.model.siglip import SigLipLoss
from clip.model import CLIP, CLIPConfig
from clip.model.text import TextConfig
from launch.runtime.gradcache import CachedContrastiveStep
from mae.vit import ViTConfig
from ranks import average_over_ranks

CFG = CLIPConfig(vision=ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2),
                 text=TextConfig(vocab_size=40, context_length=8, embed_dim=16, depth=2, num_heads=2),
                 embed_dim=8)
N, K, C = 8, 4, 2  # global batch, micro-batches, caption slots


class Eager:
    """The engine's interface on a plain module: backward is autograd's, step does nothing."""

    def __init__(self, model):
        self.module, self.forwards = model, 0

    def __call__(self, *args):
        self.forwards += 1
        return self.module(*args)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass


def batch(n: int, seed: int, captionless: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 40, (n, C, 8), generator=g)
    lengths = torch.randint(2, 8, (n, C), generator=g)
    tokens[torch.arange(8).expand(n, C, 8) == lengths[..., None]] = 2  # EOT
    tokens[torch.arange(8).expand(n, C, 8) > lengths[..., None]] = 0
    mask = torch.ones(n, C, dtype=torch.bool)
    mask[1, 1] = mask[5, 0] = False  # an image without its second / first language
    if captionless:
        mask[6] = False  # and one without any caption
    return {"images": [torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 16, 16, generator=g)],
            "tokens": tokens, "text_mask": mask}


def split(b: dict, k: int) -> list[dict]:
    n = b["tokens"].shape[0] // k
    return [{"images": [x[i * n:(i + 1) * n] for x in b["images"]], "tokens": b["tokens"][i * n:(i + 1) * n],
             "text_mask": b["text_mask"][i * n:(i + 1) * n]} for i in range(k)]


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(model, batches, loss_fn) -> tuple[torch.Tensor, dict]:
    """One loss over the concatenated micro-batches, every forward kept in the graph."""
    model.zero_grad()
    out = [model(b["images"], b["tokens"], b["text_mask"]) for b in batches]
    img, txt = torch.cat([o[0] for o in out], 1), torch.cat([o[1] for o in out], 0)
    loss = loss_fn(img, txt, torch.cat([b["text_mask"] for b in batches]), out[0][2])
    loss.backward()
    return loss.detach(), grads(model)


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(got) > 20
    for k in want:
        scale = want[k].abs().max().clamp(min=1e-12)
        assert (got[k] - want[k]).abs().max() / scale < 1e-5, k


def test_cached_step_equals_one_step_over_the_whole_batch():
    torch.manual_seed(0)
    model = CLIP(CFG.__class__(**{**CFG.__dict__, "patch_dropout": 0.3})).train()  # random draws to replay
    micro = split(batch(N, 1), K)
    torch.manual_seed(7)
    want_loss, want = reference(model, micro, ClipLoss())
    model.zero_grad()
    torch.manual_seed(7)
    engine = Eager(model)
    loss, scale = CachedContrastiveStep(engine, ClipLoss())(micro)
    assert engine.forwards == 2 * K - 1  # the last micro-batch's graph is kept, not recomputed
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert_close(grads(model), want)
    assert model.logit_scale.grad.abs() > 0  # the temperature got its gradient too

    # without randomness the reference is literally one forward over the whole batch
    model = CLIP(CFG).train()
    full = batch(N, 2)
    model.zero_grad()
    o = model(full["images"], full["tokens"], full["text_mask"])
    ClipLoss()(o[0], o[1], full["text_mask"], o[2]).backward()
    want = grads(model)
    model.zero_grad()
    CachedContrastiveStep(Eager(model), ClipLoss())(split(full, K))
    assert_close(grads(model), want)


class _Teacher:
    """Features that are fixed functions of the pixels and the caption strings."""

    logit_scale = 20.0

    def encode_image(self, images, mean, std):
        return torch.nn.functional.normalize(images.flatten(1)[:, :6], dim=-1)

    def encode_text(self, texts):
        codes = torch.tensor([[float(ord(c)) for c in (t * 6)[:6]] for t in texts])
        return torch.nn.functional.normalize(codes, dim=-1)


def test_cached_step_with_distillation_equals_one_step_over_the_whole_batch():
    """The teacher's targets taken per micro-batch and concatenated: the KL term over the whole
    batch, its gradients those of one plain step (the English-only teacher skips Korean slots)."""
    from clip.model.distill import DistillLoss, DistillTerm

    def with_captions(b: dict, seed: int) -> dict:
        n = b["tokens"].shape[0]
        caps = [[f"cap{seed}-{i}-{c}" if b["text_mask"][i, c] else "" for c in range(C)] for i in range(n)]
        langs = [[lang if b["text_mask"][i, c] else "" for c, lang in enumerate(("en", "ko"))] for i in range(n)]
        return {**b, "captions": caps, "slot_languages": langs}

    full = with_captions(batch(N, 4), 4)
    micro = [{**m, "captions": full["captions"][i * (N // K):(i + 1) * (N // K)],
              "slot_languages": full["slot_languages"][i * (N // K):(i + 1) * (N // K)]}
             for i, m in enumerate(split(full, K))]
    term = DistillTerm(_Teacher(), DistillLoss(), 0.5, (0.5,) * 3, (0.5,) * 3, languages=["en"])
    torch.manual_seed(0)
    model = CLIP(CFG).train()
    model.zero_grad()
    o = model(full["images"], full["tokens"], full["text_mask"])
    targets = term.targets(full["images"], full["captions"], full["text_mask"], full["slot_languages"])
    assert targets.mask[:, 1].sum() == 0 and targets.mask[:, 0].sum() == N - 1  # English slots only
    want_loss = ClipLoss()(o[0], o[1], full["text_mask"], o[2]) + term(o[0], o[1], o[2], targets)
    want_kl = float(term.last)
    want_loss.backward()
    want = grads(model)
    model.zero_grad()
    loss, _ = CachedContrastiveStep(Eager(model), ClipLoss(), term)(micro)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-6, atol=0)
    assert float(term.last) == pytest.approx(want_kl, rel=1e-6) and want_kl > 0.01
    assert_close(grads(model), want)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for ckpt in (False, True):  # activation checkpointing must not change the gradients either
            torch.manual_seed(0)
            model = CLIP(CFG).train()
            model.set_grad_checkpointing(ckpt)
            full = batch(N, 3)
            mine = split(full, world)[rank]  # this rank's contiguous half, as K / world micro-batches
            CachedContrastiveStep(Eager(model), ClipLoss(rank, world))(split(mine, K // world))
            g = grads(model)
            average_over_ranks(g.values())
            torch.save(g, f"{out_dir}/rank{rank}_ckpt{int(ckpt)}.pt")
    finally:
        dist.destroy_process_group()


def test_cached_step_on_two_ranks_equals_one_process(tmp_path):
    """2 ranks x 2 cached micro-batches, with and without activation checkpointing, give the
    gradients of one plain step over the whole batch in one process."""
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = CLIP(CFG).train()
    full = batch(N, 3)
    o = model(full["images"], full["tokens"], full["text_mask"])
    ClipLoss()(o[0], o[1], full["text_mask"], o[2]).backward()
    want = grads(model)
    for rank in range(2):
        for ckpt in (0, 1):
            assert_close(torch.load(tmp_path / f"rank{rank}_ckpt{ckpt}.pt", weights_only=True), want)


# ----------------------------------------------------------------------------- the sigmoid loss

EXCHANGES = ("shift", "bidir", "gather")


def _siglip_model() -> CLIP:
    """The tiny CLIP with a SigLIP bias of shape (1,) (-2, not -10: gradients of a useful size)."""
    torch.manual_seed(0)
    model = CLIP(CFG).train()
    model.logit_bias = torch.nn.Parameter(torch.full((1,), -2.0))
    return model


def _siglip_big_step() -> dict:
    model = _siglip_model()
    full = batch(N, 3, captionless=True)
    out = model(full["images"], full["tokens"], full["text_mask"])
    SigLipLoss()(out[0], out[1], full["text_mask"], out[2], model.logit_bias).backward()
    g = grads(model)
    assert "logit_bias" in g
    return g


def test_cached_sigmoid_step_equals_one_big_step():
    """CachedContrastiveStep passes the model's logit_bias to the loss and applies its gradient."""
    want = _siglip_big_step()
    model = _siglip_model()
    CachedContrastiveStep(Eager(model), SigLipLoss(max_block=5))(split(batch(N, 3, captionless=True), K))
    assert_close(grads(model), want)


def _siglip_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for exchange in EXCHANGES:
            model = _siglip_model()
            mine = split(batch(N, 3, captionless=True), world)[rank]  # this rank's contiguous half
            CachedContrastiveStep(Eager(model), SigLipLoss(rank, world, exchange=exchange))(split(mine, K // world))
            g = grads(model)
            average_over_ranks(g.values())
            torch.save(g, f"{out_dir}/rank{rank}_{exchange}.pt")
    finally:
        dist.destroy_process_group()


def test_cached_sigmoid_step_on_two_ranks_equals_one_big_step(tmp_path):
    mp.spawn(_siglip_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    want = _siglip_big_step()
    for rank in range(2):
        for exchange in EXCHANGES:
            assert_close(torch.load(tmp_path / f"rank{rank}_{exchange}.pt", weights_only=True), want)


@pytest.mark.slow
def test_accumulated_clip_run_trains_like_the_big_batch(tmp_path, tiny_tokenizer_dir):
    """Under DeepSpeed: micro-batch 4 x 2 cached gives the losses of micro-batch 8 (same samples,
    same draws); per-micro-batch accumulation contrasts 4 at a time and gives others."""
    root = Path(__file__).resolve().parents[1]

    def losses(name: str, *extra: str) -> list[float]:
        out = tmp_path / name
        cmd = [sys.executable, str(root / "launch" / "clip.py"), "--config", str(root / "configs" / "clip_tiny.yaml"),
               f"run.out_dir={out}", f"data.tokenizer={tiny_tokenizer_dir}", "train.steps=3", "run.log_every=1",
               "val_every=0", "train.num_workers=0", "train.warmup_steps=1", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads(x)["train/loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    big = losses("big", "train.micro_batch_size=8")
    cached = losses("cached", "train.micro_batch_size=4", "train.grad_accum=2")
    plain = losses("plain", "train.micro_batch_size=4", "train.grad_accum=2", "accumulation=per_micro_batch")
    assert cached == pytest.approx(big, rel=1e-5)
    assert plain[0] != pytest.approx(big[0], rel=1e-3)  # each half contrasted on its own: other values
