"""A short seeded run of each stage gives the very loss values pinned here (one process on CPU,
fp32, from ``metrics.jsonl``): code that moves or restructures the runtime must not move them; a
change meant to move them (how augmentation is seeded, say) re-pins them and says so. The CLIP
run covers multi-crop, parallel captions, per-micro-batch accumulation, both freeze windows and a
validation in the middle of training (which must not change what training draws next). Values
are compared to 1e-3 relative: other versions of torch, torchvision and timm move the last digits
(1.2e-4 between the dependency floors and the current releases), while a change of data order,
augmentation, schedule, freezing or loss moves them by far more."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAE_LOSS = [1.079485297203064, 1.070689082145691, 1.0603586435317993, 1.032232642173767, 1.0296058654785156,
            1.0189870595932007]
CLIP_LOSS = [2.632964611053467, 2.750627636909485, 2.550850987434387, 2.899977684020996, 2.5915493965148926,
             2.4655548334121704]
CLIP_LR = [0.0005, 0.001, 0.001, 0.0008535533905932737, 0.0005, 0.00014644660940672628]


def _run(args: list[str], cwd: Path) -> None:
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_seeded_runs_give_the_pinned_losses(tmp_path, tiny_tokenizer_dir):
    common = ["train.steps=6", "train.warmup_steps=2", "run.log_every=1", "train.micro_batch_size=8",
              "train.num_workers=0"]
    _run([str(ROOT / "launch" / "mae.py"), "--config", str(ROOT / "configs" / "mae_tiny.yaml"), "data.impl=torchvision",
          f"run.out_dir={tmp_path / 'mae'}", "vis_every=0", *common], tmp_path)
    _run([str(ROOT / "launch" / "clip.py"), "--init", str(tmp_path / "mae" / "mae_ckpt.pt"),
          "--config", str(ROOT / "configs" / "clip_tiny.yaml"), f"run.out_dir={tmp_path / 'clip'}",
          f"data.tokenizer={tiny_tokenizer_dir}", "val_every=3", "train.grad_accum=2", "accumulation=per_micro_batch", "augment.impl=torchvision",
          "freeze.image_steps=2",
          "freeze.text_steps=1", *common], tmp_path)
    mae, clip = _train_rows(tmp_path / "mae"), _train_rows(tmp_path / "clip")
    assert [r["train/loss"] for r in mae] == pytest.approx(MAE_LOSS, rel=1e-3)
    assert [r["train/loss"] for r in clip] == pytest.approx(CLIP_LOSS, rel=1e-3)
    assert [r["train/lr"] for r in clip] == pytest.approx(CLIP_LR, rel=1e-9)
