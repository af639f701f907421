"""Activation checkpointing (``train.grad_checkpointing``) changes memory, not results: the same
loss and gradients for both CLIP towers and the MAE encoder and decoder, in one process and on 2
ranks (CLIP on 2 ranks: ``tests/test_gradcache.py``)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip.model.loss import ClipLoss
from clip.model import CLIP, CLIPConfig
from clip.model.text import TextConfig
from mae.model import MAEConfig, MaskedAutoencoder
from mae.vit import ViTConfig
from ranks import average_over_ranks

VISION = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)


def loss_and_grads(model, loss_of, checkpointing: bool):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad()
    torch.manual_seed(5)  # the same masking / patch-dropout draws in both passes
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, loss_of):
    base_loss, base = loss_and_grads(model, loss_of, False)
    ckpt_loss, got = loss_and_grads(model, loss_of, True)
    torch.testing.assert_close(ckpt_loss, base_loss, rtol=1e-6, atol=0)
    assert got.keys() == base.keys() and len(base) > 20
    for k in base:
        torch.testing.assert_close(got[k], base[k], rtol=1e-5, atol=1e-7, msg=k)


def test_clip_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(vision=VISION, text=TextConfig(vocab_size=40, context_length=8, embed_dim=16, depth=2,
                                                           num_heads=2), embed_dim=8, patch_dropout=0.25)).train()
    images = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    tokens = torch.randint(3, 40, (4, 1, 8))
    tokens[:, :, 5] = 2  # EOT

    def loss_of(m):
        img, txt, scale = m(images, tokens)
        return ClipLoss()(img, txt, torch.ones(4, 1, dtype=torch.bool), scale)

    assert_same(model, loss_of)


def test_checkpointing_is_used(monkeypatch):
    import mae.vit

    calls = []
    real = mae.vit.checkpoint
    monkeypatch.setattr(mae.vit, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = MaskedAutoencoder(MAEConfig(encoder=VISION, decoder_embed_dim=16, decoder_depth=3, decoder_num_heads=2))
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 32, 32))[0].backward()
    assert len(calls) == 2 + 3  # every encoder and decoder block
    calls.clear()
    with torch.no_grad():  # nothing to save memory for without a graph
        model(torch.randn(2, 3, 32, 32))
    assert not calls


def test_mae_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig(encoder=VISION, decoder_embed_dim=16, decoder_depth=2,
                                        decoder_num_heads=2)).train()
    imgs = torch.randn(4, 3, 32, 32)
    assert_same(model, lambda m: m(imgs)[0])


MAE_TINY = MAEConfig(encoder=VISION, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)


def _mae_half_loss(model, imgs, rank):
    torch.manual_seed(100 + rank)  # each rank's own masking draws
    return model(imgs.chunk(2)[rank])[0]


def _mae_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MaskedAutoencoder(MAE_TINY).train()
        model.set_grad_checkpointing(True)
        _mae_half_loss(model, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), rank).backward()
        g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        average_over_ranks(g.values())
        torch.save(g, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_mae_checkpointing_on_two_ranks_equals_one_process(tmp_path):
    """2 ranks with checkpointing, each on its half of the batch with its own masks, average to the
    gradient of one process without checkpointing over both halves (the MAE loss is a mean over
    equally many masked patches per sample, so the halves weigh equally)."""
    mp.spawn(_mae_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAE_TINY).train()
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (sum(_mae_half_loss(model, imgs, r) for r in range(2)) / 2).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(want) > 20
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)
