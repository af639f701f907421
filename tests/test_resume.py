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


def _run(out, *extra):
    cmd = [sys.executable, MAE, "--config", CFG, f"run.out_dir={out}", "train.steps=4", "train.warmup_steps=2",
           "run.log_every=1", "vis_every=0", "train.micro_batch_size=8", "train.num_workers=0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _mae(out, *extra):
    r = _run(out, *extra)
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
    first_config = (out / "config.yaml").read_text()

    # training settings change on resume only when named, and the change is recorded, not overwritten
    r = _run(out, "--resume", "train.steps=8", "train.lr=0.003")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: --resume: train.lr was 0.002, this run has 0.003; resume with the run's settings (--config "
        f"{out / 'config.yaml'}) or allow the change with --allow-changed train.lr")
    r = _run(out, "--resume", "train.num_workers=1", "--allow-changed", "train.num_workers")
    assert r.returncode == 2 and "train.num_workers was 0, this run has 1; the data position of a run cannot" in r.stderr
    rows = _mae(out, "--resume", "train.steps=8", "--allow-changed", "train.steps")
    assert (out / "config.yaml").read_text() == first_config  # the first part's record kept
    history = (out / "config.resume-1.yaml").read_text()
    assert history.splitlines()[0] == "# resumed (1 of this run); changed since config.yaml: train.steps 4 -> 8"
    assert "steps: 8" in history
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


@pytest.mark.slow
def test_resume_without_checkpoint_starts_afresh(tmp_path):
    """A run killed before its first checkpoint: a restart without --resume is refused (it would
    overwrite the folder), one with --resume starts afresh and says so."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')  # what the killed run had logged
    r = _run(out, "train.steps=1")
    assert r.returncode == 2 and "already holds a run (a metrics.jsonl); continue it with --resume" in r.stderr
    r = _run(out, "--resume", "train.steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"note: --resume: no checkpoint in {out / 'checkpoints'} yet: starting the run afresh" in r.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
