"""ClipLoss against an explicit-loop reference, row chunks against one block, and 1 x B == 2 x B/2
(whole and chunked) with real gloo processes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip.model.loss import ClipLoss
from ranks import average_over_ranks


def reference_loss(img, txt, mask, scale):
    """Loops over crops, images and captions; log-softmax written out by hand."""
    V, N, _ = img.shape
    C = txt.shape[1]
    caps = [(n, c) for n in range(N) for c in range(C) if mask[n, c]]
    total = 0.0
    for v in range(V):
        i2t = []
        for i in range(N):
            own = [k for k, (n, _) in enumerate(caps) if n == i]
            if not own:
                continue
            logits = torch.stack([scale * torch.dot(img[v, i], txt[n, c]) for n, c in caps])
            logp = logits - torch.log(torch.exp(logits).sum())
            i2t.append(-sum(logp[k] for k in own) / len(own))
        t2i = []
        for n, c in caps:
            logits = torch.stack([scale * torch.dot(txt[n, c], img[v, j]) for j in range(N)])
            logp = logits - torch.log(torch.exp(logits).sum())
            t2i.append(-logp[n])
        total = total + (sum(i2t) / len(i2t) + sum(t2i) / len(t2i)) / 2
    return total / V


def _features(V, N, C, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(V, N, E, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(N, C, E, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_one_caption_equals_standard_clip_loss():
    img, txt = _features(1, 6, 1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    mask = torch.ones(6, 1, dtype=torch.bool)
    loss = ClipLoss()(img, txt, mask, scale)
    logits = scale * img[0] @ txt[:, 0].T
    labels = torch.arange(6)
    standard = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(loss, standard, atol=1e-12)
    assert torch.allclose(loss, reference_loss(img, txt, mask, scale), atol=1e-12)


def test_parallel_captions_masked_slots_and_crops_match_reference():
    img, txt = _features(3, 5, 2, seed=1)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    # image 3 has no caption at all: it is still a column for t2i but has no i2t row
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    loss = ClipLoss()(img, txt, mask, scale)
    ref = reference_loss(img, txt, mask, scale)
    assert torch.allclose(loss, ref, atol=1e-12)
    g = torch.autograd.grad(loss, (img, txt, scale))
    g_ref = torch.autograd.grad(ref, (img, txt, scale))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert g[1][1, 1].abs().max() == 0  # a masked slot's feature gets no gradient


def test_crops_average_and_shape_errors():
    img, txt = _features(2, 4, 1, seed=2)
    mask = torch.ones(4, 1, dtype=torch.bool)
    s = torch.tensor(5.0, dtype=torch.float64)
    per_crop = [ClipLoss()(img[v:v + 1], txt, mask, s) for v in range(2)]
    assert torch.allclose(ClipLoss()(img, txt, mask, s), (per_crop[0] + per_crop[1]) / 2)
    with pytest.raises(ValueError, match="batch mismatch"):
        ClipLoss()(img, txt[:3], mask[:3], s)


def test_row_chunks_equal_one_block():
    """max_block chunks this rank's rows (recomputed in backward): the same loss and gradients."""
    img, txt = _features(3, 7, 2, seed=4)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)

    def run(loss_fn):
        leaves = (img.clone().requires_grad_(), txt.clone().requires_grad_(),
                  torch.tensor(6.0, dtype=torch.float64, requires_grad=True))
        loss = loss_fn(*leaves[:2], mask, leaves[2])
        return loss, torch.autograd.grad(loss, leaves)

    assert ClipLoss(max_block=3 * 7 * 2 * 2).rows_per_chunk(3, 7, 7, 2) == 2  # 2 + 2 + 2 + 1 rows
    assert ClipLoss().rows_per_chunk(3, 7, 7, 2) == ClipLoss(max_block=10 ** 9).rows_per_chunk(3, 7, 7, 2) == 7
    want_loss, want = run(ClipLoss())
    for max_block in (3 * 7 * 2 * 2, 1):  # 2 rows per chunk; 1 row per chunk
        loss, got = run(ClipLoss(max_block=max_block))
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():  # evaluation: chunks without checkpointing
        torch.testing.assert_close(ClipLoss(max_block=1)(img, txt, mask, torch.tensor(6.0, dtype=torch.float64)),
                                   want_loss.detach(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="max_block"):
        ClipLoss(max_block=-1)


# ---- world-size invariance with two real processes -------------------------------------------

WORLD, B, FIN, E = 2, 3, 6, 5
CASES = {  # name: (V, C, mask over the global batch of WORLD * B images)
    "plain": (1, 1, [[1]] * (WORLD * B)),
    "parallel_multicrop": (2, 2, [[1, 1], [1, 0], [0, 1],    # rank 0: 4 valid captions
                                  [1, 1], [1, 1], [1, 0]]),  # rank 1: 5 valid captions
}


def _case(name):
    V, C, mask = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    towers = (torch.nn.Linear(FIN, E).double(), torch.nn.Linear(FIN, E).double())
    with torch.no_grad():
        for p in (*towers[0].parameters(), *towers[1].parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(8.0), dtype=torch.float64))
    x_img = torch.randn(V, WORLD * B, FIN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(WORLD * B, C, FIN, generator=g, dtype=torch.float64)
    return towers, logit_scale, x_img, x_txt, torch.tensor(mask, dtype=torch.bool)


def _step(name, rank, world_size, max_block=0):
    """Loss and leaf-parameter gradients on this rank's slice of the global batch."""
    (img_tower, txt_tower), logit_scale, x_img, x_txt, mask = _case(name)
    lo, hi = rank * (WORLD * B // world_size), (rank + 1) * (WORLD * B // world_size)
    img = F.normalize(img_tower(x_img[:, lo:hi]), dim=-1)
    txt = F.normalize(txt_tower(x_txt[lo:hi]), dim=-1)
    loss_fn = ClipLoss(rank, world_size, max_block=max_block)
    loss = loss_fn(img, txt, mask[lo:hi], logit_scale.exp())
    loss.backward()
    params = [*img_tower.parameters(), *txt_tower.parameters(), logit_scale]
    grads = [p.grad.clone() for p in params]
    loss = loss.detach().clone()
    if world_size > 1:
        average_over_ranks((*grads, loss))
    return loss, grads


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        results = {name: _step(name, rank, WORLD) for name in CASES}
        # this rank's 3 rows in chunks of 2 + 1 (the columns gathered once, outside the chunks)
        results.update({f"{name}_chunked": _step(name, rank, WORLD, max_block=2 * CASES[name][0] * WORLD * B
                                                 * CASES[name][1]) for name in CASES})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_world_size_invariance_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in [*CASES, *(f"{n}_chunked" for n in CASES)]:
            loss_1, grads_1 = _step(name.removesuffix("_chunked"), 0, 1)
            loss_2, grads_2 = results[name]
            assert torch.allclose(loss_2, loss_1, atol=1e-12), name
            assert len(grads_2) == len(grads_1) == 5
            for g2, g1 in zip(grads_2, grads_1):
                assert g1.abs().max() > 0
                assert torch.allclose(g2, g1, atol=1e-12), name
