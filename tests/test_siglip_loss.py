"""SigLipLoss against an explicit-loop reference (loss and gradients, several positives per image,
multi-crop), row chunks against one block, its level at constant logits, 1 x B == W x B/W with
real gloo processes for every exchange. (Feature-cached accumulation with the sigmoid loss:
tests/test_gradcache.py.)"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clip.model.siglip import SigLipLoss, chance_level, constant_logit_loss
from ranks import average_over_ranks

EXCHANGES = ("shift", "bidir", "gather")


def reference_loss(img, txt, mask, scale, bias):
    """Loops over crops, images and valid captions: -log sigmoid(label * logit), label +1 for the
    image's own captions and -1 for every other one; over crops x valid captions."""
    V, N, _ = img.shape
    C = txt.shape[1]
    total = 0.0
    for v in range(V):
        for i in range(N):
            for n in range(N):
                for c in range(C):
                    if mask[n, c]:
                        logit = scale * torch.dot(img[v, i], txt[n, c]) + bias
                        label = 1.0 if n == i else -1.0
                        total = total - torch.log(torch.sigmoid(label * logit))
    return total / (V * int(mask.sum()))


def _features(V, N, C, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(V, N, E, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(N, C, E, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


# image 3 has no caption at all: it is only ever a negative
MASK = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)


def _run(loss_fn, img, txt, mask, scale=6.0, bias=-2.5):
    leaves = (img.clone().requires_grad_(), txt.clone().requires_grad_(),
              torch.tensor(scale, dtype=torch.float64, requires_grad=True),
              torch.tensor(bias, dtype=torch.float64, requires_grad=True))
    loss = loss_fn(*leaves[:2], mask, *leaves[2:])
    return loss, torch.autograd.grad(loss, leaves)


def test_parallel_captions_masked_slots_and_crops_match_reference():
    img, txt = _features(3, 7, 2, seed=1)
    want_loss, want = _run(reference_loss, img, txt, MASK)
    for max_block in (0, 3 * 7 * 2 * 3, 1):  # one block; 3 + 3 + 1 rows; 1 row per chunk
        loss, got = _run(SigLipLoss(max_block=max_block), img, txt, MASK)
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
        for a, b in zip(got, want):
            assert b.abs().max() > 1e-3
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert got[1][1, 1].abs().max() == got[1][3].abs().max() == 0  # masked slots get no gradient
    assert SigLipLoss(max_block=3 * 7 * 2 * 3).rows_per_chunk(3, 7, 2) == 3
    with torch.no_grad():  # evaluation: no gradients taken in forward
        torch.testing.assert_close(SigLipLoss(max_block=1)(img, txt, MASK, torch.tensor(6.0, dtype=torch.float64),
                                                           torch.tensor(-2.5, dtype=torch.float64)),
                                   want_loss, rtol=0, atol=1e-12)


def test_one_caption_is_the_big_vision_value():
    """V = C = 1: the sum over pairs of -log sigmoid(label * logit) over the number of images."""
    img, txt = _features(1, 6, 1, seed=2)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    loss = SigLipLoss()(img, txt, torch.ones(6, 1, dtype=torch.bool), scale, bias)
    logits = scale * img[0] @ txt[:, 0].T + bias
    labels = 2 * torch.eye(6, dtype=torch.float64) - 1
    torch.testing.assert_close(loss, -F.logsigmoid(labels * logits).sum() / 6, rtol=0, atol=1e-12)
    open_clip_loss = pytest.importorskip("open_clip.loss")
    torch.testing.assert_close(loss, open_clip_loss.SigLipLoss()(img[0], txt[:, 0], scale, bias), rtol=0, atol=1e-12)


def test_constant_logits_and_chance_level():
    """Zero features make every logit the bias: the loss is constant_logit_loss whatever the crops,
    slots and masks, and chance_level is its minimum over the bias."""
    img, txt = torch.zeros(3, 7, 4, dtype=torch.float64), torch.zeros(7, 2, 4, dtype=torch.float64)
    for bias in (-10.0, -1.0, 0.5):
        loss, grads = _run(SigLipLoss(), img, txt, MASK, bias=bias)
        assert loss.item() == pytest.approx(constant_logit_loss(7, bias), rel=1e-12)
        loss_1, _ = _run(SigLipLoss(), img[:1], txt[:, :1], torch.ones(7, 1, dtype=torch.bool), bias=bias)
        assert loss_1.item() == pytest.approx(loss.item(), rel=1e-12)
    best = -math.log(7 - 1)
    loss, grads = _run(SigLipLoss(), img, txt, MASK, bias=best)
    assert loss.item() == pytest.approx(chance_level(7), rel=1e-12)
    assert abs(grads[3].item()) < 1e-12  # d loss / d bias = 0: the minimum
    assert chance_level(7) < min(constant_logit_loss(7, best + d) for d in (-0.1, 0.1))
    assert chance_level(32768) == pytest.approx(math.log(32768) + 1, abs=1e-4)
    assert constant_logit_loss(32768, -10.0) > chance_level(32768)  # SigLIP's init bias starts above it
    assert chance_level(1) == 0.0


def test_shape_errors():
    img, txt = _features(2, 4, 1)
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch mismatch"):
        SigLipLoss()(img, txt[:3], torch.ones(3, 1, dtype=torch.bool), one, one)
    with pytest.raises(ValueError, match="one element"):
        SigLipLoss()(img, txt, torch.ones(4, 1, dtype=torch.bool), one, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_block"):
        SigLipLoss(max_block=-1)
    with pytest.raises(ValueError, match="exchange"):
        SigLipLoss(exchange="reduce")


# ---- world-size invariance with real processes ---------------------------------------------

N, FIN, E = 8, 6, 5
CASES = {  # name: (V, C, mask over the global batch of N images)
    "plain": (1, 1, [[1]] * N),
    # 2 ranks: 4 and 3 valid captions; 4 ranks: the last has none at all
    "parallel_multicrop": (3, 2, [[1, 1], [1, 0], [0, 1], [0, 0], [1, 1], [0, 1], [0, 0], [0, 0]]),
}


def _case(name):
    V, C, mask = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    towers = (nn.Linear(FIN, E).double(), nn.Linear(FIN, E).double())
    with torch.no_grad():
        for p in (*towers[0].parameters(), *towers[1].parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    logit_scale = nn.Parameter(torch.tensor(math.log(8.0), dtype=torch.float64))
    logit_bias = nn.Parameter(torch.tensor([-2.0], dtype=torch.float64))  # shape (1,), as the model's
    x_img = torch.randn(V, N, FIN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(N, C, FIN, generator=g, dtype=torch.float64)
    return towers, logit_scale, logit_bias, x_img, x_txt, torch.tensor(mask, dtype=torch.bool)


def _step(name, rank, world_size, **loss_args):
    """Loss and leaf-parameter gradients on this rank's slice of the global batch, averaged over
    the ranks (what the trainer logs and what DeepSpeed applies)."""
    (img_tower, txt_tower), logit_scale, logit_bias, x_img, x_txt, mask = _case(name)
    lo, hi = rank * (N // world_size), (rank + 1) * (N // world_size)
    img = F.normalize(img_tower(x_img[:, lo:hi]), dim=-1)
    txt = F.normalize(txt_tower(x_txt[lo:hi]), dim=-1)
    loss = SigLipLoss(rank, world_size, **loss_args)(img, txt, mask[lo:hi], logit_scale.exp(), logit_bias)
    loss.backward()
    params = [*img_tower.parameters(), *txt_tower.parameters(), logit_scale, logit_bias]
    grads = [p.grad.clone() for p in params]
    loss = loss.detach().clone()
    if world_size > 1:
        average_over_ranks((*grads, loss))
    return loss, grads


def _variants():
    return {f"{name}_{exchange}_{max_block}": (name, {"exchange": exchange, "max_block": max_block})
            for name in CASES for exchange in EXCHANGES for max_block in (0, 1)}


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {key: _step(name, rank, world, **args) for key, (name, args) in _variants().items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])  # 4: bidir sends both ways, then one more hop to the right
def test_world_size_invariance(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    want = {name: _step(name, 0, 1) for name in CASES}
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert results.keys() == _variants().keys()
        for key, (name, _) in _variants().items():
            loss_1, grads_1 = want[name]
            loss_w, grads_w = results[key]
            torch.testing.assert_close(loss_w, loss_1, rtol=0, atol=1e-12, msg=key)
            assert len(grads_w) == len(grads_1) == 6
            for g_w, g_1 in zip(grads_w, grads_1):
                assert g_1.abs().max() > 1e-3
                torch.testing.assert_close(g_w, g_1, rtol=0, atol=1e-12, msg=key)
