"""DeepSpeed behind one door: each private attribute or behaviour ``launch.runtime.engine`` relies on
(its ``PRIVATE`` table) is checked here against the installed DeepSpeed, so that a release that
changes one fails a test instead of a run. (The fp16 loss scaler's swap and the clipping threshold
at the loss scale are checked end to end in ``tests/test_runtime.py``: an initial scale of 2**8
is the one logged, and fp16 ZeRO-2 clipping lands where fp32 clipping does.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from launch.runtime import engine as door

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "dp_runtime.py")


def test_only_the_door_imports_deepspeed(repo_root):
    users = []
    for folder in ("mae", "clip", "tokenizer", "launch"):
        for path in (repo_root / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if "import deepspeed" in text or "from deepspeed" in text:
                users.append(str(path.relative_to(repo_root)))
    assert users == ["launch/runtime/engine.py"]


def _engine(tmp_path, **train):
    """A one-process engine on a tiny model (gloo on the CPU)."""
    from launch.runtime.config import TrainConfig
    from launch.runtime.optim import LRSchedule, param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    cfg = TrainConfig(steps=4, micro_batch_size=2, lr=0.1, warmup_steps=1, num_workers=0, **train)
    dist = door.init_distributed()
    groups, windows = param_groups(model, 0.0)
    return door.Engine(model, cfg, dist, groups, LRSchedule(cfg, 1, windows))


def _in_subprocess(code: str, tmp_path) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh process: DeepSpeed's process group
    and globals do not leak into the test process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


PRELUDE = f"""
import json, sys, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_engine import _engine
"""


def test_fp16_grad_scaler_is_where_the_door_looks(tmp_path):
    """DeepSpeed keeps the GradScaler of its torch_autocast section at ``engine.torch_autocast_z0_gradscaler``
    (no ZeRO) or ``engine.optimizer.torch_autocast_gradscaler`` (ZeRO 1/2); ours replaces it there."""
    out = _in_subprocess(PRELUDE + """
res = {}
for zero in (0, 1):
    e = _engine(None, precision="fp16", zero_stage=zero, fp16_initial_scale_power=5)
    theirs = e._find_grad_scaler()
    res[zero] = [theirs is e._scaler, e.loss_scale]
print(json.dumps(res))
""", tmp_path)
    assert out == {"0": [True, 32.0], "1": [True, 32.0]}


def test_zero_optimizer_clips_at_clip_grad(tmp_path):
    """The ZeRO optimizer's clipping threshold is its ``clip_grad`` attribute, read at each step."""
    out = _in_subprocess(PRELUDE + """
e = _engine(None, zero_stage=1, grad_clip=1.0)
print(json.dumps({"has": hasattr(e.ds.optimizer, "clip_grad"), "value": e.ds.optimizer.clip_grad}))
""", tmp_path)
    assert out == {"has": True, "value": 1.0}


def test_leaving_the_process_group_drops_deepspeeds_world_group(tmp_path):
    out = _in_subprocess(PRELUDE + """
e = _engine(None)
import deepspeed.utils.groups as groups
before = hasattr(groups, "_WORLD_GROUP")
from launch.runtime.engine import shutdown_distributed
shutdown_distributed()
print(json.dumps({"before": before, "after": groups._WORLD_GROUP is None,
                  "destroyed": not torch.distributed.is_initialized()}))
""", tmp_path)
    assert out == {"before": True, "after": True, "destroyed": True}


@pytest.mark.slow
def test_cpu_allreduce_buffer_is_where_the_door_unlinks_it(tmp_path, free_port):
    """Two CPU ranks: while they run, DeepSpeed's shared-memory all-reduce buffer of each rank is at
    ``shm_buffer_path`` (so unlinking that path releases it), and after the run it is gone."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port), SCRIPT, str(tmp_path / "run"),
                        "train.micro_batch_size=4", "train.steps=2"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads((tmp_path / "run" / "shm.json").read_text())
    assert seen == {"0": True}  # rank 0 saw its own buffer at the path
    assert not [k for k in (0, 1) if os.path.exists(door.shm_buffer_path(k, "127.0.0.1", str(free_port)))]


def test_a_group_leaving_its_freeze_window_starts_its_adam_moments_there(tmp_path):
    """Under ZeRO the optimizer steps every group every step (frozen ones with zero gradients); the
    engine drops a group's state at the end of its window, reaching the torch optimizer under
    DeepSpeed's wrapper (``engine.optimizer.optimizer``, one flat partition per group, our order)."""
    out = _in_subprocess(PRELUDE + """
from launch.runtime import engine as door
from launch.runtime.config import TrainConfig
from launch.runtime.optim import FreezeSchedule, LRSchedule, param_groups
res = {}
for zero in (0, 1):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 1)})
    cfg = TrainConfig(steps=4, micro_batch_size=2, lr=0.1, warmup_steps=1, num_workers=0, zero_stage=zero,
                      weight_decay=0.0)
    freeze = FreezeSchedule(model, {"a.": 2})
    groups, specs = param_groups(model, 0.0, freeze)
    e = door.Engine(model, cfg, door.init_distributed() if zero == 0 else e.dist, groups, LRSchedule(cfg, 1, specs))
    for step in range(3):
        freeze.apply(step)
        loss = model["b"](model["a"](torch.ones(2, 4))).sum()
        e.backward(loss)
        e.step()
    inner = getattr(e.ds.optimizer, "optimizer", e.ds.optimizer)
    steps = [[int(inner.state[p]["step"]) if p in inner.state else 0 for p in g["params"]] for g in inner.param_groups]
    res[zero] = {"steps": steps, "groups": len(inner.param_groups), "wrapped": inner is not e.ds.optimizer}
print(json.dumps(res))
""", tmp_path)
    # groups: b's weight and bias (no window) took all three steps; a's (window 2) start at step 2: one step
    assert out["1"]["wrapped"] and out["1"]["groups"] == 4 and out["1"]["steps"] == [[3], [3], [1], [1]]
    assert not out["0"]["wrapped"] and out["0"]["steps"] == [[3], [3], [1], [1]]
