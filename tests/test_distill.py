"""Distillation from a frozen teacher CLIP: the teachers we read, the image-text KL term, and the
text-only stage (``launch/distill_text.py``) end to end.

The teacher is trained here, in a short loop (250 steps of 128, about 15 s on one core): a tiny
CLIP (32 px ViT 64 x 2, text 64 x 2 on the session's 2,000-token BPE) on the ENGLISH captions of the
bundled emoji only, the 15 % of base emoji that the CLIP stage holds out left out. The student (a
text tower of the same size, from scratch) is then distilled on the emoji names as text pairs
(en, ko) of the training split: no image, and no held-out emoji (300 steps of 64 pairs). Measured
(seed 0): held-out Korean names' cosine to the teacher's embedding of their English name 0.00
before, 0.55 after, against 0.45 for another held-out name's English (the tiny teacher's names are
all alike); held-out image -> Korean caption mean rank 83 of 267 (chance 134, five standard errors
24), the teacher's own with English captions 86 and with Korean ones 121.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip.model.distill import DistillLoss, DistillTerm, TeacherTargets
from oneline import error_line
from procs import run_pairs
from ranks import average_over_ranks

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT / "data" / "emoji" / "captions.jsonl"
DISTILL = [sys.executable, str(ROOT / "launch" / "distill_text.py"), "--config",
           str(ROOT / "configs" / "demo" / "distill_text.yaml")]
STEPS = 300


# ----------------------------------------------------------------------------- the image-text KL term


def reference_kl(img, txt, mask, scale, t_img, t_txt, t_scale):
    """Loops over crops, images and valid captions; F.kl_div on explicitly listed rows."""
    V, N, _ = img.shape
    caps = [(n, c) for n in range(N) for c in range(txt.shape[1]) if mask[n, c]]
    total = 0.0
    for v in range(V):
        i2t, t2i = [], []
        for i in range(N):
            s = torch.stack([scale * img[v, i] @ txt[n, c] for n, c in caps])
            t = torch.stack([t_scale * t_img[i] @ t_txt[n, c] for n, c in caps])
            i2t.append(F.kl_div(s.log_softmax(0), t.log_softmax(0), log_target=True, reduction="sum"))
        for n, c in caps:
            s = torch.stack([scale * txt[n, c] @ img[v, j] for j in range(N)])
            t = torch.stack([t_scale * t_txt[n, c] @ t_img[j] for j in range(N)])
            t2i.append(F.kl_div(s.log_softmax(0), t.log_softmax(0), log_target=True, reduction="sum"))
        total = total + (sum(i2t) / len(i2t) + sum(t2i) / len(t2i)) / 2
    return total / V


def _unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_kl_term_equals_direct_reference():
    g = torch.Generator().manual_seed(0)
    img, txt, t_img, t_txt = _unit(g, 2, 5, 8), _unit(g, 5, 2, 8), _unit(g, 5, 6), _unit(g, 5, 2, 6)
    # image 3 has no caption: still a row of image -> text and a column of text -> image
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    loss = DistillLoss()(img, txt, mask, scale, t_img, t_txt, 9.0)
    ref = reference_kl(img, txt, mask, scale, t_img, t_txt, 9.0)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, (img, txt, scale)), torch.autograd.grad(ref, (img, txt, scale))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # a student equal to its teacher has nothing left to learn; the masked slot's text does not count
    same = DistillLoss()(t_img[None].expand(3, -1, -1), t_txt, mask, torch.tensor(9.0, dtype=torch.float64),
                         t_img, t_txt + 5 * (~mask)[..., None], 9.0)
    assert abs(float(same)) < 1e-12
    with pytest.raises(ValueError, match="batch mismatch"):
        DistillLoss()(img, txt[:4], mask[:4], scale, t_img, t_txt, 9.0)


class _ToyTeacher:
    """A teacher whose features are fixed functions of the pixels and the caption strings."""

    logit_scale = 20.0

    def encode_image(self, images, mean, std):
        return F.normalize(images.flatten(1)[:, :6].double(), dim=-1)

    def encode_text(self, texts):
        codes = torch.tensor([[float(ord(c)) for c in (t * 6)[:6]] for t in texts], dtype=torch.float64)
        return F.normalize(codes, dim=-1)


def test_distill_term_reads_first_crop_and_the_teachers_slots_and_concatenates():
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 2, 2, generator=g)]
    mask = torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    caps = [["a cat", ""], ["a dog", "개"], ["", "고양이"]]
    slots = [["en", ""], ["en", "ko"], ["", "ko"]]
    term = DistillTerm(_ToyTeacher(), DistillLoss(), weight=0.5, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    t = term.targets(crops, caps, mask, slots)
    torch.testing.assert_close(t.image, _ToyTeacher().encode_image(crops[0], None, None))
    assert torch.equal(t.mask, mask) and t.text[0, 1].abs().max() == 0 and t.text[2, 0].abs().max() == 0
    torch.testing.assert_close(t.text[1, 1], _ToyTeacher().encode_text(["개"])[0])
    img, txt = _unit(g, 2, 3, 6), _unit(g, 3, 2, 6)
    scale = torch.tensor(5.0, dtype=torch.float64)
    got = term(img, txt, scale, t)
    torch.testing.assert_close(got, 0.5 * DistillLoss()(img, txt, mask, scale, t.image, t.text, 20.0))
    # feature-cached accumulation: micro-batches' targets concatenated = the whole batch's targets
    both = TeacherTargets.cat([term.targets([c[:2] for c in crops], caps[:2], mask[:2], slots[:2]),
                               term.targets([c[2:] for c in crops], caps[2:], mask[2:], slots[2:])])
    for a, b in zip(both, t):
        torch.testing.assert_close(a, b)
    # an English teacher: the Korean slots are out of the KL, as if masked
    english = DistillTerm(_ToyTeacher(), DistillLoss(), 1.0, (0, 0, 0), (1, 1, 1), languages=("en",))
    t_en = english.targets(crops, caps, mask, slots)
    assert t_en.mask.tolist() == [[True, False], [True, False], [False, False]]
    torch.testing.assert_close(english(img, txt, scale, t_en),
                               DistillLoss()(img, txt, t_en.mask, scale, t_en.image, t_en.text, 20.0))
    assert torch.isfinite(english(img, txt, scale, english.targets(crops, caps, mask, [["ko"] * 2] * 3)))
    with pytest.raises(ValueError, match="slot_languages"):
        english.targets(crops, caps, mask)


WORLD, B, FIN, E = 2, 3, 6, 5


def _kl_step(rank, world_size):
    """Loss and leaf gradients of a student (two linear towers and a temperature) on this rank's
    slice of a global batch of WORLD * B images with 2 crops and 2 caption slots."""
    g = torch.Generator().manual_seed(7)
    towers = (torch.nn.Linear(FIN, E).double(), torch.nn.Linear(FIN, E).double())
    with torch.no_grad():
        for p in (*towers[0].parameters(), *towers[1].parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(8.0), dtype=torch.float64))
    x_img = torch.randn(2, WORLD * B, FIN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(WORLD * B, 2, FIN, generator=g, dtype=torch.float64)
    t_img, t_txt = _unit(g, WORLD * B, 4), _unit(g, WORLD * B, 2, 4)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    lo, hi = rank * (WORLD * B // world_size), (rank + 1) * (WORLD * B // world_size)
    img = F.normalize(towers[0](x_img[:, lo:hi]), dim=-1)
    txt = F.normalize(towers[1](x_txt[lo:hi]), dim=-1)
    loss = DistillLoss(rank, world_size)(img, txt, mask[lo:hi], logit_scale.exp(), t_img[lo:hi], t_txt[lo:hi], 12.0)
    loss.backward()
    grads = [p.grad.clone() for p in (*towers[0].parameters(), *towers[1].parameters(), logit_scale)]
    loss = loss.detach().clone()
    if world_size > 1:
        average_over_ranks((*grads, loss))  # what DeepSpeed does with the gradients, the trainer with the loss
    return loss, grads


def _kl_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(_kl_step(rank, WORLD), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_kl_term_one_rank_equals_two_gloo_ranks(tmp_path):
    mp.spawn(_kl_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    loss_1, grads_1 = _kl_step(0, 1)
    for rank in range(WORLD):
        loss_2, grads_2 = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(loss_2, loss_1, rtol=0, atol=1e-12)
        for a, b in zip(grads_2, grads_1):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- teachers


def _tiny_clip(tok, width: int = 64, heads: int = 4, **vision):
    from clip.model import CLIP, CLIPConfig
    from clip.model.text import TextConfig
    from mae.vit import ViTConfig

    shared = {k: v for k, v in vision.items() if k in ("act_layer", "norm_eps")}
    text = TextConfig(vocab_size=tok.vocab_size, context_length=32, embed_dim=width, depth=2, num_heads=heads,
                      eot_id=tok.eot_id, pad_id=tok.pad_id, **shared)
    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=width, depth=2, num_heads=heads, **vision)
    pool = "token" if vision.get("pre_norm") else "avg"
    return CLIP(CLIPConfig(vision=vit, text=text, embed_dim=64, vision_pool=pool))


def _save_run(model, tok_dir: Path, folder: Path, languages=("en",)) -> Path:
    from clip.model import save_clip
    from tokenizer import BilingualTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tok_dir, folder / "tokenizer", dirs_exist_ok=True)
    save_clip(model, folder / "clip_ckpt.pt", tokenizer=BilingualTokenizer.from_dir(tok_dir).fingerprint,
              languages=list(languages))
    return folder


def test_teachers_of_every_kind_encode_alike(tiny_tokenizer_dir, tmp_path):
    """Our run folder, its open_clip export (run by open_clip) and its OpenAI-layout weights with the
    tokenizer folder: the same features, and the same CLIP for the distilled model's image side."""
    from safetensors.torch import save_file

    from clip.interop.export import export_open_clip
    from clip.interop.openai_layout import to_openai_layout
    from clip.interop.teacher import load_teacher
    from tokenizer import BilingualTokenizer

    tok = BilingualTokenizer.from_dir(tiny_tokenizer_dir)
    torch.manual_seed(0)
    # OpenAI's architecture: ln_pre, QuickGELU, eps 1e-5, class-token pooling, width / 64 heads
    model = _tiny_clip(tok, 128, 2, pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5)
    ours = load_teacher(_save_run(model, tiny_tokenizer_dir, tmp_path / "run"))
    tok.context_length = 32
    export_open_clip(model, tok, tmp_path / "open_clip")
    save_file(to_openai_layout(model.state_dict()), str(tmp_path / "openai.safetensors"))
    texts, images = ["a red heart", "고양이 얼굴", "grinning face"], torch.randn(2, 3, 32, 32)
    want_t, want_i = ours.encode_text(texts), ours.encode_image(images)
    assert ours.kind == "enko" and ours.clip is not None and want_t.shape == (3, 64)
    for teacher in (load_teacher(tmp_path / "open_clip"),
                    load_teacher(tmp_path / "openai.safetensors", tiny_tokenizer_dir, "quick_gelu")):
        torch.testing.assert_close(teacher.encode_text(texts), want_t, rtol=0, atol=2e-5)
        torch.testing.assert_close(teacher.encode_image(images), want_i, rtol=0, atol=2e-5)
        assert teacher.logit_scale == pytest.approx(ours.logit_scale)
        torch.testing.assert_close(teacher.clip.encode_image(images), want_i, rtol=0, atol=2e-5)
    # pixels normalised otherwise, at another size: re-normalised, then resized to the teacher's input
    pix = torch.rand(2, 3, 16, 16)
    tm, ts = (torch.tensor(v).view(1, 3, 1, 1) for v in (ours.image_mean, ours.image_std))
    want = ours.encode_image(F.interpolate((pix - tm) / ts, size=(32, 32), mode="bicubic", antialias=True))
    torch.testing.assert_close(ours.encode_image((pix - 0.5) / 0.25, mean=(0.5,) * 3, std=(0.25,) * 3), want,
                               rtol=0, atol=1e-5)
    for bad, match in ((ROOT / "README.md", "not a CLIP teacher"), (tmp_path, "not a CLIP teacher"),
                       (tmp_path / "openai.safetensors", "carry no tokenizer")):
        with pytest.raises(ValueError, match=match) as e:
            load_teacher(bad)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- text-only distillation


@pytest.fixture(scope="module")
def teacher(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """The English-only emoji teacher (module docstring), saved as a run folder."""
    from clip.data.pairs import split_rows
    from clip.model.loss import ClipLoss
    from mae.images.decode import load_rgb
    from mae.images.sources import iter_manifest
    from mae.images.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, eval_transform
    from tokenizer import BilingualTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait for each other on a shared machine
    try:
        tok = BilingualTokenizer.from_dir(tiny_tokenizer_dir)
        train, _ = split_rows(list(iter_manifest(EMOJI)), 0.15, "base", 0)
        view = eval_transform(32, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        images = torch.stack([view(load_rgb(r["path"])) for r in train])  # (1331, 3, 32, 32)
        tokens = tok.encode_batch([r["en"] for r in train], context_length=32)
        torch.manual_seed(0)
        model = _tiny_clip(tok)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
        g, loss_fn, n = torch.Generator().manual_seed(0), ClipLoss(), 128
        for _ in range(250):
            idx = torch.randint(len(train), (n,), generator=g)
            x = images[idx].flip(-1) if torch.rand(1, generator=g) < 0.5 else images[idx]
            img, txt, scale = model([x], tokens[idx])
            loss = loss_fn(img, txt, torch.ones(n, 1, dtype=torch.bool), scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
    finally:
        torch.set_num_threads(threads)
    return _save_run(model.eval(), tiny_tokenizer_dir, tmp_path_factory.mktemp("teacher"))


def _args(out: Path, teacher: Path, tok: Path, cache: Path, *extra: str) -> list[str]:
    return DISTILL + [f"run.out_dir={out}", f"distill.teacher={teacher}", f"distill.cache={cache}",
                      f"data.tokenizer={tok}", f"data.source={EMOJI}", "model.text.embed_dim=64", "model.text.depth=2",
                      f"train.steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=10", "train.num_workers=1",
                      "run.log_every=25", "run.ckpt_every=50", "run.keep_last=0", "val_every=100", *extra]


def _run(cmd: list[str], cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ENKO_FAULT", None)
    if fault:
        env["ENKO_FAULT"] = fault
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def distilled(teacher, tiny_tokenizer_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    cache = root / "teacher_cache.safetensors"
    _ok(_run(_args(root / "full", teacher, tiny_tokenizer_dir, cache), root))
    return {"root": root, "full": root / "full", "cache": cache}


def _cosines(encode, teacher, rows) -> dict:
    """Mean cosine of each held-out Korean name to the teacher's embedding of its own English name
    and of the next row's."""
    with torch.no_grad():
        sim = F.normalize(encode([r["ko"] for r in rows]), dim=-1) @ teacher.encode_text([r["en"] for r in rows]).T
    return {"own": float(sim.diagonal().mean()), "other": float(sim.roll(-1, dims=1).diagonal().mean())}


@pytest.mark.slow
def test_korean_lands_on_the_teachers_english_and_retrieves_images(distilled, teacher, tiny_tokenizer_dir, tmp_path):
    import clip
    from clip.eval.cli import main as eval_main
    from clip.eval.tasks import evaluate_retrieval
    from clip.interop.export import export
    from clip.interop.teacher import load_teacher
    from clip.model.checkpoint import load_clip_and_tokenizer
    from launch.runtime.config import load_config
    from launch.runtime.dist import set_seed
    from launch.stages.distill_text import build_student
    from launch.stages.distill_text_config import DistillTextRunConfig, resolve
    from mae.images.sources import iter_manifest
    from clip.data.pairs import split_rows

    _, held_out = split_rows(list(iter_manifest(EMOJI)), 0.15, "base", 0)  # 267 emoji neither model trained on
    t = load_teacher(teacher)
    # before: the student exactly as the stage initialised it (its config resolved, seeded the same)
    cfg = load_config(DistillTextRunConfig, DISTILL[-1], _args(tmp_path, teacher, tiny_tokenizer_dir,
                                                                distilled["cache"])[4:])
    run = resolve(cfg)
    set_seed(run.cfg.train.seed)
    student = build_student(run).eval()
    before = _cosines(lambda texts: student(run.tokenizer.encode_batch(texts)), t, held_out)
    model, tok = load_clip_and_tokenizer(distilled["full"])
    after = _cosines(lambda texts: model.encode_text(tok.encode_batch(texts)), t, held_out)
    # measured 0.03 -> 0.40 (own) against 0.30 (another name's English): the gain is not only the
    # teacher's mean direction, the own sentence is clearly nearer than another one
    assert after["own"] > before["own"] + 0.2, (before, after)
    assert after["own"] > after["other"] + 0.05, after

    # image -> Korean caption over the held-out emoji: the teacher's image tower, the student's Korean
    res = evaluate_retrieval(model, tok, held_out, ("en", "ko"), return_ranks=True)
    n = res["n_images"]
    mean_rank = float(res["ranks"]["ko"]["image_to_text"].float().mean())
    # chance: a uniform rank of 1..n, mean (n + 1) / 2 with standard error sqrt((n^2 - 1) / 12 / n)
    chance, se = (n + 1) / 2, math.sqrt((n * n - 1) / 12 / n)
    assert n == 267 and mean_rank < chance - 5 * se, (mean_rank, chance, se)
    # the Korean comes from the distillation: the teacher itself reads Korean at about chance (measured 121)
    taught = evaluate_retrieval(t.clip, t.tokenizer, held_out, ("ko",), return_ranks=True)
    assert mean_rank < float(taught["ranks"]["ko"]["image_to_text"].float().mean()) - 5 * se

    # the output is a whole CLIP for clip.load, python -m clip.eval and the open_clip export
    loaded, _ = clip.load(distilled["full"])
    assert loaded.trained_languages == ["en", "ko"]
    assert eval_main(["retrieval", "--checkpoint", str(distilled["full"]), "--data", str(EMOJI), "--split", "val",
                      "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics_retrieval.json").read_text())
    assert metrics["languages"]["ko"]["n_texts"] == 267
    folder = export(str(distilled["full"]), "open_clip", str(tmp_path / "open_clip"))
    assert (folder / "open_clip_model.safetensors").is_file()
    rows = [json.loads(line) for line in (distilled["full"] / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/cos_ko" in r]
    assert [r["step"] for r in val] == [100, 200, 300]
    assert val[-1]["val/cos_ko"] == pytest.approx(after["own"], abs=1e-4)


@pytest.mark.slow
def test_kill_then_resume_is_bit_identical(distilled, teacher, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    args = _args(out, teacher, tiny_tokenizer_dir, distilled["cache"])
    assert _run(args, tmp_path, "step:160").returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text() == "step_0000150"
    _ok(_run(args + ["--resume"], tmp_path))
    want = torch.load(distilled["full"] / "clip_ckpt.pt", weights_only=True)["model"]
    got = torch.load(out / "clip_ckpt.pt", weights_only=True)["model"]
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    keys = ("step", "train/loss", "train/lr", "train/samples_in_partial_batches_total")
    rows = lambda d: [[r.get(k) for k in keys] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                      if "train/loss" in r]  # noqa: E731
    assert rows(out) == rows(distilled["full"])


def test_cache_gives_the_loss_of_the_teacher_in_the_step(teacher, tiny_tokenizer_dir, tmp_path):
    from clip.data.parallel import TextPairCollate, TextPairSource, distinct_targets, read_pairs
    from clip.interop.teacher import load_teacher
    from clip.interop.teacher_cache import check_text_cache, read_text_cache, write_text_cache
    from clip.model.distill import TextStudent
    from clip.model.text import TextTransformer
    from launch.stages.distill_text import DistillTextStep

    t = load_teacher(teacher)
    rows, _ = read_pairs(str(EMOJI), ("en", "ko"))
    rows = rows[:200]
    targets = distinct_targets(rows, "en")
    path = tmp_path / "cache.safetensors"
    assert not check_text_cache(path, t, targets)
    write_text_cache(path, t, targets, batch_size=64)
    cache = read_text_cache(path, t, targets)
    torch.manual_seed(0)
    student = TextStudent(TextTransformer(t.clip.cfg.text), 64, 64)
    source = TextPairSource(rows, ("en", "ko"), seed=3)
    batch = TextPairCollate(t.tokenizer, 32)(list(source)[:48])
    for kind in ("mse", "cosine"):
        cached, _ = DistillTextStep(student, t, cache, ("en", "ko"), kind).forward(batch)
        live, _ = DistillTextStep(student, t, None, ("en", "ko"), kind).forward(batch)
        torch.testing.assert_close(cached, live, rtol=1e-6, atol=1e-7)
    # keyed by the sentences and the teacher: either changed, the cache is refused in one line
    with pytest.raises(ValueError, match="stale: written for other sentences"):
        check_text_cache(path, t, targets[:-1])
    other = load_teacher(teacher)
    with torch.no_grad():
        other.model.logit_scale.add_(0.5)
    with pytest.raises(ValueError, match="stale: written for another teacher"):
        check_text_cache(path, other, targets)


def _error_line(argv: list[str], capsys) -> str:
    from launch.stages.distill_text import main

    return error_line(main, argv, capsys)


def test_not_a_clip_and_unprojectable_widths_are_one_line(teacher, tiny_tokenizer_dir, tmp_path, capsys):
    base = DISTILL[2:] + [f"run.out_dir={tmp_path / 'out'}", f"data.tokenizer={tiny_tokenizer_dir}",
                          f"data.source={EMOJI}"]
    stale = tmp_path / "stale.safetensors"
    stale.write_bytes(b"not safetensors")
    cases = [
        ([f"distill.teacher={ROOT / 'README.md'}"], "is not a CLIP teacher"),
        ([f"distill.teacher={tiny_tokenizer_dir}"], "is not a CLIP teacher"),
        ([f"distill.teacher={tmp_path / 'nowhere'}"], "teacher not found"),
        (["distill.teacher="], "distill.teacher is not set"),
        ([f"distill.teacher={teacher}", "model.embed_dim=48"], "model.embed_dim=48: the student projects into"),
        ([f"distill.teacher={teacher}", "model.projection=false", "model.text.embed_dim=32", "model.text.num_heads=4"],
         "model.projection=false: the student tower is 32 wide and the teacher's embedding 64"),
        ([f"distill.teacher={teacher}", f"distill.cache={stale}"], "not a teacher-embedding cache"),
        ([f"distill.teacher={teacher}", "distill.loss=l1"], "'distill.loss' must be one of mse, cosine"),
    ]
    for extra, expected in cases:
        line = _error_line(base + extra, capsys)
        assert expected in line, (extra, line)
    assert not (tmp_path / "out").exists()


def test_transformers_student_trains_and_is_saved_as_a_clip(teacher, tmp_path):
    """``model.text_tower=hf``: the encoder's own tokenizer, its width read from its config and
    projected; the output CLIP carries the encoder's config and loads without its folder."""
    from hf_tiny import save_tiny_xlmr

    from clip.model.checkpoint import load_clip_and_tokenizer
    from clip.data.parallel import TextPairCollate, TextPairSource
    from launch.runtime.config import load_config
    from launch.stages.distill_text import DistillTextStep, build_student, save_output
    from launch.stages.distill_text_config import DistillTextRunConfig, resolve

    hf = save_tiny_xlmr(tmp_path / "xlmr", hidden=48)
    cfg = load_config(DistillTextRunConfig, DISTILL[-1], [f"distill.teacher={teacher}", f"data.source={EMOJI}",
                                                          "model.text_tower=hf", f"model.hf_text.path={hf}",
                                                          "distill.cache="])
    run = resolve(cfg)
    assert run.embed_dim == 64 and run.cfg.model.text.pad_id == 1 and run.cache is None
    torch.manual_seed(0)
    student = build_student(run)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    step = DistillTextStep(student, run.teacher, None, ("en", "ko"), "cosine")
    batch = TextPairCollate(run.tokenizer, 32)(list(TextPairSource(run.train_rows[:32], ("en", "ko"))))
    losses = []
    for _ in range(5):
        loss, metrics = step.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and set(metrics) >= {"cos_en", "cos_ko"}
    run.tokenizer.save(tmp_path / "out" / "tokenizer")
    assert save_output(run, student.eval(), tmp_path / "out") == "clip_ckpt.pt"
    model, tok = load_clip_and_tokenizer(tmp_path / "out")
    ids = tok.encode_batch(["고양이 얼굴", "cat face"])
    torch.testing.assert_close(model.encode_text(ids), F.normalize(student(ids), dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.visual_proj.weight, run.teacher.clip.visual_proj.weight)


# ----------------------------------------------------------------------------- image-text, in the CLIP stage


def test_clip_stage_adds_the_teachers_term(teacher, tiny_tokenizer_dir, tmp_path):
    """``distill.teacher`` in the CLIP stage: two runs from the same seed on the same batches, the
    KL term weighted 1 and 0 (logged, no gradient). At step 1 the weighted run's loss is the other's
    plus its KL; after that their weights, and so their KLs, part."""
    clip_script = [sys.executable, str(ROOT / "launch" / "clip.py"), "--config", str(ROOT / "configs" / "demo" / "clip.yaml")]
    common = [f"data.tokenizer={tiny_tokenizer_dir}", f"data.source={EMOJI}", f"distill.teacher={teacher}",
              "model.vision.img_size=32", "model.vision.patch_size=8", "model.vision.embed_dim=64",
              "model.vision.depth=2", "model.text.context_length=32", "model.text.embed_dim=64", "model.text.depth=2",
              "model.embed_dim=64", "augment.global_size=32", "augment.local_crops=0", "freeze.image_steps=0",
              "train.steps=8", "train.micro_batch_size=32", "train.lr=2e-3", "train.warmup_steps=2",
              "train.num_workers=0", "run.log_every=1", "val_every=0"]
    run_pairs({w: clip_script + common + [f"run.out_dir={tmp_path / f'w{w}'}", f"distill.weight={w}"] for w in (1.0, 0.0)},
              cwd=tmp_path)
    logs = {w: [json.loads(x) for x in (tmp_path / f"w{w}" / "metrics.jsonl").read_text().splitlines()
                if '"train/distill_kl"' in x] for w in (1.0, 0.0)}
    on, off = logs[1.0], logs[0.0]
    assert len(on) == len(off) == 8 and on[0]["train/distill_kl"] > 0.1
    assert on[0]["train/distill_kl"] == pytest.approx(off[0]["train/distill_kl"], rel=1e-6)
    assert on[0]["train/loss"] == pytest.approx(off[0]["train/loss"] + on[0]["train/distill_kl"], rel=1e-5)
    assert abs(on[-1]["train/distill_kl"] - off[-1]["train/distill_kl"]) > 1e-3
    assert on[-1]["train/distill_kl"] < on[0]["train/distill_kl"]
