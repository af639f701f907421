"""Faults a run on preemptible machines meets, injected into tiny CPU runs.

Kills are real SIGKILLs: from inside at a chosen point (``ENKO_FAULT=step:N`` after optimizer step
N, ``save:N`` inside the checkpoint save of step N, after DeepSpeed's files and before the
manifest and ``latest``) and from outside at whatever point the run has reached. After each,
``--resume`` must end with exactly the weights and the logged losses of the run that was never
stopped. The data is a 30-image manifest with one missing image, at micro-batch 8: with two
workers every epoch ends in partial batches, so the runs cross many epoch boundaries.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from oneline import error_line

ROOT = Path(__file__).resolve().parents[1]
MAE = [sys.executable, str(ROOT / "launch" / "mae.py"), "--config", str(ROOT / "configs" / "mae_tiny.yaml")]
CLIP = [sys.executable, str(ROOT / "launch" / "clip.py"), "--config", str(ROOT / "configs" / "clip_tiny.yaml")]
COMMON = ["train.warmup_steps=2", "run.log_every=1", "train.micro_batch_size=8", "run.ckpt_every=3",
          "run.keep_last=0"]


def run(cmd: list[str], cwd: Path, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ENKO_FAULT", None)
    if fault:
        env["ENKO_FAULT"] = fault
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process failed with ``code`` and said why in exactly one line, its last (no traceback;
    the libraries' own log lines, such as DeepSpeed's start-up, may come before it)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and lines, r.stderr[-3000:]
    assert [line for line in lines if "error: " in line] == lines[-1:], r.stderr[-3000:]
    return lines[-1]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "train/loss" in r]


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path, export: str) -> None:
    """Bit-identical exported weights and identical logged losses, lrs and data counts."""
    wa, wb = weights(a / export), weights(b / export)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after the resume"
    keys = ("step", "train/loss", "train/lr", "train/skipped_samples_total", "train/samples_in_partial_batches_total")
    assert [[r.get(k) for k in keys] for r in train_rows(a)] == [[r.get(k) for k in keys] for r in train_rows(b)]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """30 emoji rows (absolute paths) and one whose image is missing."""
    root = tmp_path_factory.mktemp("small")
    lines = (ROOT / "data" / "emoji" / "captions.jsonl").read_text(encoding="utf-8").splitlines()[:30]
    out = []
    for line in lines:
        row = json.loads(line)
        row["file"] = str(ROOT / "data" / "emoji" / row["file"])
        out.append(json.dumps(row, ensure_ascii=False))
    out.insert(7, json.dumps({"key": "gone", "file": str(root / "missing.png"), "en": "missing", "ko": "없음",
                              "base": "gone"}))
    (root / "small.jsonl").write_text("\n".join(out) + "\n", encoding="utf-8")
    return root / "small.jsonl"


EMA = ["train.ema.decay=0.9", "train.ema.start_step=2"]  # the weight average rides along in the exact-resume runs


def mae_args(out: Path, small: Path, workers: int, steps: int = 10) -> list[str]:
    return MAE + [f"run.out_dir={out}", f"data.source={small}", f"train.num_workers={workers}", f"train.steps={steps}",
                  "vis_every=0", *COMMON, *EMA]


@pytest.fixture(scope="module")
def mae_full(small, tmp_path_factory) -> dict[int, Path]:
    """The uninterrupted MAE runs, with 0 and with 2 workers."""
    root = tmp_path_factory.mktemp("mae_full")
    return {w: ok(run(mae_args(root / f"w{w}", small, w), root)) and root / f"w{w}" for w in (0, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("workers,fault", [(0, "save:6"), (2, "step:7")])
def test_kill_then_resume_mae_is_exact(workers, fault, small, mae_full, tmp_path):
    out = tmp_path / "run"
    r = run(mae_args(out, small, workers), tmp_path, fault)
    assert r.returncode == -signal.SIGKILL
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == ("step_0000003" if fault == "save:6" else f"step_{3 * (int(fault[5:]) // 3):07d}")
    ok(run(mae_args(out, small, workers) + ["--resume"], tmp_path))
    assert_same_run(mae_full[workers], out, "mae_ckpt.pt")
    assert train_rows(out)[-1]["train/skipped_samples_total"] > 0  # the missing image, counted across the resume
    # train.ema: the average lives in rank 0's resume state, so it resumes bit-identically too
    assert_same_run(mae_full[workers], out, "mae_ckpt_ema.pt")
    full, avg = weights(out / "mae_ckpt.pt"), weights(out / "mae_ckpt_ema.pt")
    assert any(not torch.equal(full[k], avg[k]) for k in full)  # an average, not a copy


@pytest.mark.slow
def test_kill_from_outside_torn_metrics_and_damaged_checkpoints(small, mae_full, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(mae_args(out, small, 2), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "latest").is_file() and (out / "checkpoints" / "latest").read_text() >= "step_0000006":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints" / "latest").is_file()
    with open(out / "metrics.jsonl", "ab") as f:  # a torn last row
        f.write(b'{"step": 99, "train/lo')
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    newest = out / "checkpoints" / tags[-1] / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated newest checkpoint
    (out / "checkpoints" / "latest").write_text("")  # and an empty latest
    r = ok(run(mae_args(out, small, 2) + ["--resume"], tmp_path))
    assert f"skipping checkpoint {tags[-1]}" in r.stderr
    assert_same_run(mae_full[2], out, "mae_ckpt.pt")


@pytest.mark.slow
def test_restart_without_resume_is_refused_and_destroys_nothing(small, mae_full, tmp_path):
    run_dir = mae_full[0]
    before = (run_dir / "metrics.jsonl").read_bytes()
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    line = one_line_error(run(mae_args(run_dir, small, 0), tmp_path))
    assert "already holds a run" in line and "--resume" in line
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == tags


@pytest.mark.slow
def test_pruning_keeps_the_newest_by_step(small, tmp_path):
    out = tmp_path / "run"
    ok(run(mae_args(out, small, 0, steps=12) + ["run.keep_last=2"], tmp_path))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000009", "step_0000012"]
    assert (out / "checkpoints" / "latest").read_text() == "step_0000012"


@pytest.mark.slow
def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(small, tmp_path):
    out = tmp_path / "run"
    r = run(mae_args(out, small, 0, steps=30) + ["train.lr=10", "train.warmup_steps=1", "run.ckpt_every=1"], tmp_path)
    line = one_line_error(r, code=3)
    assert "diverged" in line or "non-finite" in line
    assert not (out / "mae_ckpt.pt").exists()
    latest = (out / "checkpoints" / "latest").read_text()
    step = int(latest.split("_")[1])
    losses = {row["step"]: row["train/loss"] for row in train_rows(out)}
    assert step in losses and losses[step] < 10 * min(losses.values())  # the checkpoint is from before the blow-up


@pytest.mark.slow
def test_resume_on_another_number_of_ranks_is_refused(small, tmp_path, free_port):
    out = tmp_path / "run"
    ds = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port)]
    ok(run(ds + mae_args(out, small, 0, steps=3)[1:] + ["train.zero_stage=2"], tmp_path))
    line = one_line_error(run(mae_args(out, small, 0, steps=6) + ["--resume", "train.zero_stage=2"], tmp_path))
    assert "written by 2 ranks, this run has 1" in line


# ----------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_setup(small, mae_full, tiny_tokenizer_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip")

    def args(out: Path, *extra: str) -> list[str]:
        return CLIP + ["--init", str(mae_full[0] / "mae_ckpt.pt"), f"run.out_dir={out}", f"data.source={small}",
                       f"data.tokenizer={tiny_tokenizer_dir}", "data.val_fraction=0.2", "train.steps=8",
                       "train.num_workers=2", "train.grad_accum=2", "freeze.image_steps=3", "val_every=4",
                       *COMMON, *EMA, *extra]

    full = root / "full"
    ok(run(args(full), root))
    return {"args": args, "full": full}


@pytest.mark.slow
def test_kill_then_resume_clip_is_exact(clip_setup, tmp_path):
    out = tmp_path / "run"
    assert run(clip_setup["args"](out), tmp_path, "step:5").returncode == -signal.SIGKILL
    ok(run(clip_setup["args"](out, "--resume"), tmp_path))
    assert_same_run(clip_setup["full"], out, "clip_ckpt.pt")
    assert_same_run(clip_setup["full"], out, "clip_ckpt_ema.pt")
    val = [r for r in rows(out) if "val/loss" in r]
    assert [r["val/loss"] for r in val] == [r["val/loss"] for r in rows(clip_setup["full"]) if "val/loss" in r]


@pytest.mark.slow
def test_another_tokenizer_is_refused_by_resume_and_eval(clip_setup, tmp_path):
    from tokenizer.train import train_tokenizer

    other = tmp_path / "other_tok"  # same vocabulary size and special ids, other merges
    train_tokenizer([str(ROOT / "data" / "corpus" / "en.txt"), str(ROOT / "data" / "corpus" / "ko.txt")], str(other),
                    vocab_size=2000, max_lines_per_file=4000, seed=1)
    out = tmp_path / "run"
    assert run(clip_setup["args"](out), tmp_path, "step:4").returncode == -signal.SIGKILL
    line = one_line_error(run(clip_setup["args"](out, "--resume", f"data.tokenizer={other}"), tmp_path))
    assert "another tokenizer" in line and str(out / "tokenizer") in line
    ev = [sys.executable, "-m", "clip.eval", "retrieval", "--checkpoint", str(clip_setup["full"]), "--data",
          str(ROOT / "data" / "emoji" / "captions.jsonl"), "--out", str(tmp_path / "eval"), "--max-images", "8"]
    ok(run(ev, ROOT))
    line = one_line_error(run(ev + ["--tokenizer", str(other)], ROOT))
    assert "trained with tokenizer" in line


@pytest.mark.slow
def test_clip_lr_blow_up_stops_cleanly(clip_setup, tmp_path):
    r = run(clip_setup["args"](tmp_path / "run", "train.lr=1e6", "freeze.image_steps=0", "train.steps=20"), tmp_path)
    line = one_line_error(r, code=3)
    assert any(w in line for w in ("non-finite", "diverged", "collapsed")), line
    assert not (tmp_path / "run" / "clip_ckpt.pt").exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, tiny_tokenizer_dir):
    from launch.stages.clip import main as clip_main
    from launch.stages.mae import main as mae_main
    from mae.model import MaskedAutoencoder
    from mae.checkpoint import save_encoder_checkpoint

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"file": "a.png"}\n{"file": oops}\n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text("".join(json.dumps({"file": f"/nowhere/{i}.png", "en": "x"}) + "\n" for i in range(5)))
    shadow = tmp_path / "a_file"
    shadow.write_text("x")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "enko-clip/mae-encoder/v1", "model": Evil()}))
    tiny = ROOT / "configs" / "mae_tiny.yaml"
    from launch.runtime.config import load_config
    from launch.stages.mae import MAERunConfig

    save_encoder_checkpoint(MaskedAutoencoder(load_config(MAERunConfig, str(tiny)).model), tmp_path / "enc.pt")
    raw = torch.load(tmp_path / "enc.pt", weights_only=True)
    raw["model"].pop("cls_token")
    torch.save(raw, tmp_path / "mismatched.pt")
    out = f"run.out_dir={tmp_path / 'out'}"
    mae = ["--config", str(tiny), out]
    clip = ["--config", str(ROOT / "configs" / "clip_tiny.yaml"), out, f"data.tokenizer={tiny_tokenizer_dir}"]
    cases = [
        (mae_main, mae + [f"data.source={bad_json}"], "bad.jsonl:2: bad JSON"),
        (mae_main, mae + ["train.lr=-1"], "train.lr must be > 0"),
        (mae_main, mae + ["run.log_every=0"], "run.log_every must be >= 1"),
        (mae_main, mae + ["train.precision=fp17"], "'train.precision' must be one of fp32, bf16, fp16, got 'fp17'"),
        (mae_main, mae + [f"data.source={missing}"], "none of the first 5 images exists"),
        (mae_main, ["--config", str(tiny), f"run.out_dir={shadow / 'x'}"], f"run.out_dir={shadow / 'x'}: cannot write"),
        (mae_main, ["--config", str(tiny), "run.out_dir=/proc/x"], "run.out_dir=/proc/x: cannot write there"),
        (clip_main, clip + ["--init", str(ROOT / "README.md")], "--init: "),
        (clip_main, clip + ["--init", str(evil)], "refusing to load it"),
        (clip_main, clip + ["--init", str(tmp_path / "mismatched.pt")], "missing key cls_token"),
        (clip_main, clip + ["data.tokenizer=/nowhere"], "data.tokenizer=/nowhere"),
        (clip_main, clip + ["data.caption_mode=every"], "'data.caption_mode' must be one of all, sample"),
        (clip_main, clip + ["loss_chunk_mib=-1"], "loss_chunk_mib must be >= 0"),
        (clip_main, clip + ["data.resampled=true"], "data.resampled=true draws shards with replacement"),
        (mae_main, mae + ["data.source_weights=[1,2]"], "data.source_weights weigh shard draws"),
        # impossible combinations and ranges, refused at load (one line, exit 2, before any process work)
        (clip_main, clip + ["augment.strong=true", "augment.impl=device"], "augment.strong photometric augmentation runs"),
        (clip_main, clip + ["augment.global_crops=0"], "augment.global_crops >= 1 is needed"),
        (clip_main, clip + ["freeze.image_steps=-5"], "freeze.image_steps must be >= 0, got -5"),
        (clip_main, clip + ["augment.local_size=30"], "augment.local_size=30 is not divisible by the image tower's patch"),
        (clip_main, clip + ["augment.local_scale=[0.5,0.2]"], "augment.local_scale must be an area range"),
        (clip_main, clip + ["data.val_fraction=1"], "data.val_fraction must be in [0, 1)"),
        (clip_main, clip + ["data.languages=[en,en]"], "data.languages must be distinct"),
        (clip_main, clip + ["model.patch_dropout=1"], "model.patch_dropout must be in [0, 1)"),
        (clip_main, clip + ["model.text.num_heads=5"], "model.text.embed_dim 64 is not divisible by num_heads 5"),
        (clip_main, clip + ["train.compile=true", "model.patch_dropout=0.5", "train.grad_accum=2"],
         "train.compile with model.patch_dropout and cached accumulation"),
        (mae_main, mae + ["model.encoder.img_size=70"], "model.encoder.img_size 70 is not divisible by patch_size 16"),
        (mae_main, mae + ["data.scale=[0,1]"], "data.scale must be an area range"),
    ]
    for main, argv, expected in cases:
        line = error_line(main, argv, capsys)
        assert expected in line, (argv[-1], line)
        assert "weights_only=False" not in line
    assert not marker.exists()

    from tokenizer.train import main as tok_main

    noise = tmp_path / "noise.txt"
    # seeded noise plus two text lines, so the file has usable lines and the message is always the
    # "mostly not UTF-8" one (pure urandom sometimes had no decodable line at all)
    noise.write_bytes(random.Random(0).randbytes(200_000) + b"\nsome text\nmore text\n")
    assert tok_main(["--corpus", str(ROOT / "data" / "corpus" / "en.txt"), str(noise), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mostly not UTF-8 text" in err[0] and "noise.txt" in err[0]


# ----------------------------------------------------------------------------- the last faults (one run
# per folder, lost samples, damaged tokenizers, a full disk)

@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_unharmed(small, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(mae_args(out, small, 0, steps=30), cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / ".lock").is_file() and (out / ".lock").read_text().strip()):
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # paused, still alive and holding the lock, however busy the machine
    try:
        line = one_line_error(run(mae_args(out, small, 0, steps=30), tmp_path))
    finally:
        first.send_signal(signal.SIGCONT)
    assert f"run.out_dir={out} is in use by another run (pid {first.pid} on " in line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert [r["step"] for r in train_rows(out)] == list(range(1, 31))  # one run's rows, in order
    # the lock died with its process: the next run is refused only because the folder holds a run
    assert "already holds a run" in one_line_error(run(mae_args(out, small, 0, steps=30), tmp_path))


def test_a_shard_cut_at_a_member_boundary_counts_its_lost_samples(tmp_path, data_dir):
    """A copy that ends on a 4 KiB boundary between members reads as a whole (shorter) tar: the
    samples its ``stats.json`` declares and that never came are counted, and the shard as broken."""
    from clip.data.shards import write_shards
    from clip.data.pairs import PairDataset
    from mae.images.decode import Decoded

    stats = write_shards(str(data_dir / "emoji" / "captions.jsonl"), tmp_path / "s", shard_size=100)["all"]
    shard = tmp_path / "s" / "000000.tar"
    data = shard.read_bytes()
    offsets, pos = [], 0  # member header offsets
    while pos + 512 <= len(data) and data[pos:pos + 512].count(0) != 512:
        offsets.append(pos)
        size = int(data[pos + 124:pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    cut = next(o for o in offsets if o % 4096 == 0 and o > len(data) // 3)
    shard.write_bytes(data[:cut])
    items = list(PairDataset(str(tmp_path / "s"), Decoded(lambda im: 0), shuffle=False))
    read = len({it["key"] for it in items})
    assert stats["samples"] - read == sum(it["n_skipped"] for it in items) > 0
    assert sum(it["n_broken_shards"] for it in items) == 1


def test_a_damaged_tokenizer_is_one_line(tmp_path, tiny_tokenizer_dir, make_tiny_clip_run, capsys):
    import shutil

    from clip.eval import main as eval_main
    from hf_tiny import save_tiny_xlmr
    from launch.stages.clip import main as clip_main

    ours = tmp_path / "ours"
    shutil.copytree(tiny_tokenizer_dir, ours)
    text = (ours / "tokenizer.json").read_text(encoding="utf-8")
    (ours / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")  # truncated
    hf = save_tiny_xlmr(tmp_path / "xlmr")
    (hf / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ', encoding="utf-8")
    clip = ["--config", str(ROOT / "configs" / "clip_tiny.yaml"), f"run.out_dir={tmp_path / 'out'}"]
    for argv, expected in ((clip + [f"data.tokenizer={ours}"], f"data.tokenizer={ours}: {ours}: not a readable tokenizer"),
                           (clip + ["model.text_tower=hf", f"model.hf_text.path={hf}"],
                            f"model.hf_text.path={hf}: {hf}: not a readable tokenizer")):
        line = error_line(clip_main, argv, capsys)
        assert line.startswith(f"error: {expected}"), line
    run_dir = make_tiny_clip_run(tmp_path / "run")
    capsys.readouterr()
    assert eval_main(["crosslingual", "--checkpoint", str(run_dir), "--tokenizer", str(ours), "--pairs",
                      str(ROOT / "data" / "parallel" / "en_ko.tsv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clip.eval: error: {ours}: not a readable tokenizer"), err


def test_an_unknown_token_tokenizer_is_refused_with_the_fraction(tmp_path, capsys):
    """A transformers tokenizer that reads these captions as its unknown token (a SentencePiece model
    converted the wrong way): refused before training, with the share of captions it fails on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_tiny import save_tiny_xlmr
    from launch.stages.clip import main as clip_main

    hf = save_tiny_xlmr(tmp_path / "xlmr")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "zzz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
                            pad_token="<pad>", unk_token="<unk>", mask_token="<mask>").save_pretrained(hf)
    line = error_line(clip_main, ["--config", str(ROOT / "configs" / "clip_tiny.yaml"), f"run.out_dir={tmp_path / 'o'}",
                                  "model.text_tower=hf", f"model.hf_text.path={hf}"], capsys)
    assert "its tokenizer maps 100% of a sample of the captions mostly to its unknown token" in line, line


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_keeps_latest(small, mae_full, tmp_path):
    """ENOSPC inside the checkpoint save of step 6 (after DeepSpeed wrote part of it): one line, exit
    2, the partial checkpoint removed, ``latest`` still on step 3, and the resume is exact."""
    out = tmp_path / "run"
    line = one_line_error(run(mae_args(out, small, 0), tmp_path, "save:6:enospc"))
    assert line.startswith(f"error: cannot save checkpoint step_0000006 in {out / 'checkpoints'}: no space left on the "
                           "device; a checkpoint takes about ") and "(checkpoints/latest still names step_0000003)" in line
    assert (out / "checkpoints" / "latest").read_text() == "step_0000003"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000003"]
    ok(run(mae_args(out, small, 0) + ["--resume"], tmp_path))
    assert_same_run(mae_full[0], out, "mae_ckpt.pt")


@pytest.mark.slow
def test_kill_then_resume_on_a_curated_source_is_exact(small, tmp_path):
    """``data.curation``: each epoch keeps a fresh draw of the samples (a pure function of seed,
    epoch and key), so a run killed and resumed trains on exactly the samples of one never stopped."""
    from mae.images.keep import FORMAT

    keys = [json.loads(line).get("key") for line in small.read_text(encoding="utf-8").splitlines()]
    cur = tmp_path / "curation"
    (cur / "keep").mkdir(parents=True)
    (cur / "keep" / "records-000000.keep.json").write_text(json.dumps(
        {"format": FORMAT, "unit": "records-000000", "keys": keys, "p": [0.7] * len(keys)}))
    args = [f"data.curation={cur}"]
    ok(run(mae_args(tmp_path / "full", small, 2) + args, tmp_path))
    out = tmp_path / "run"
    assert run(mae_args(out, small, 2) + args, tmp_path, "step:5").returncode == -signal.SIGKILL
    ok(run(mae_args(out, small, 2) + args + ["--resume"], tmp_path))
    assert_same_run(tmp_path / "full", out, "mae_ckpt.pt")
    assert train_rows(out)[-1]["train/epoch"] == pytest.approx(10 * 8 / round(0.7 * len(keys)))  # a curated epoch


