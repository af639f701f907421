"""``--resume`` continues a run from its latest DeepSpeed checkpoint: the step count, the lr
schedule and the weights carry on instead of starting over."""
import json
import os
import subprocess
import sys

import pytest
import torch

from launch.runtime.config import TrainConfig
from launch.runtime.optim import lr_factor

MAE = os.path.join(os.path.dirname(__file__), "..", "launch", "mae.py")
CFG = os.path.join(os.path.dirname(__file__), "..", "configs", "mae_tiny.yaml")


def _mae(out, *extra):
    cmd = [sys.executable, MAE, "--config", CFG, f"run.out_dir={out}", "train.steps=4", "train.warmup_steps=2",
           "run.log_every=1", "vis_every=0", "train.micro_batch_size=8", "train.num_workers=0", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_continues_steps_schedule_and_weights(tmp_path):
    out = tmp_path / "run"
    first = _mae(out)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000004"
    before = torch.load(out / "mae_ckpt.pt", weights_only=True)["model"]

    rows = _mae(out, "--resume", "train.steps=8")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]  # appended, not restarted
    t = TrainConfig(steps=8, warmup_steps=2)
    peak = rows[2]["train/lr"] / lr_factor(2, TrainConfig(steps=4, warmup_steps=2))
    assert rows[4]["train/lr"] == pytest.approx(peak * lr_factor(4, t), rel=1e-6)
    # the resumed run started from the step-4 weights: its first loss is close to the last one,
    # far below the untrained loss of step 1
    assert rows[4]["train/loss"] < rows[0]["train/loss"]
    assert (ckpt / "latest").read_text().strip() == "step_0000008"
    after = torch.load(out / "mae_ckpt.pt", weights_only=True)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cmd = [sys.executable, MAE, "--config", CFG, f"run.out_dir={tmp_path / 'empty'}", "--resume", "train.steps=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --resume: no checkpoint in")
