"""The DeepSpeed runtime: schedule, precision checks, and data-parallel equivalence under the real
``deepspeed`` launcher (2 CPU ranks, gloo) against one process with the same global batch."""
import json
import math
import os
from dataclasses import dataclass, field, replace
import sys

import pytest
import torch

from launch.runtime.config import ConfigError, TrainConfig
from launch.runtime.engine import PRECISIONS, deepspeed_config
from launch.runtime.optim import FreezeSchedule, LRSchedule, lr_factor, param_groups
from procs import run, run_pairs

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "dp_runtime.py")


def test_lr_schedule_warmup_then_half_cosine():
    t = TrainConfig(steps=10, warmup_steps=4)
    f = [lr_factor(s, t) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0)
    assert f[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert lr_factor(10, t, floor=0.1) == pytest.approx(0.1)
    m = torch.nn.ModuleDict({"visual": torch.nn.Linear(2, 2), "text": torch.nn.Linear(2, 2)})
    freeze, sched = FreezeSchedule(m, {"visual.": 3}), LRSchedule(t, 1)
    window = freeze.steps_for("visual.weight")
    assert sched.factor(2, window) == 0.0 and sched.factor(3, window) == 1.0 and sched.factor(2, 0) == 0.75
    assert LRSchedule(t, 1, [(window, 1.0), (0, 0.5)]).lrs(2) == [0.0, 0.5 * 0.75 * sched.peak]


def test_peak_lr_scales_with_global_batch():
    t = TrainConfig(micro_batch_size=64, grad_accum=2, base_lr=1.5e-4)
    assert LRSchedule(t, world_size=2).peak == pytest.approx(1.5e-4 * 256 / 256)
    assert LRSchedule(TrainConfig(lr=1e-3), 8).peak == 1e-3
    assert LRSchedule(TrainConfig(lr=1e-3, steps=10, warmup_steps=4), 1).lr(1) == pytest.approx(5e-4)


def test_deepspeed_config_fields():
    t = TrainConfig(micro_batch_size=4, grad_accum=3, precision="fp16", zero_stage=2, grad_clip=1.0)
    ds = deepspeed_config(t, world_size=2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    # half precision is DeepSpeed's torch autocast over fp32 weights, gradients communicated in fp32
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "torch.float16", "lower_precision_safe_modules": []}
    assert "fp16" not in ds and "bf16" not in ds
    assert deepspeed_config(replace(t, precision="bf16"), 2)["torch_autocast"]["dtype"] == "torch.bfloat16"
    assert "torch_autocast" not in deepspeed_config(replace(t, precision="fp32"), 2)
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.0


def test_precision_checks():
    from launch.runtime.config import load_config

    with pytest.raises(ConfigError, match="'train.precision' must be one of fp32, bf16, fp16, got 'fp8'"):
        load_config(_Run, None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="'train.zero_stage' must be one of 0, 1, 2, got 3"):
        load_config(_Run, None, ["train.zero_stage=3"])
    # weights fp32 always (DeepSpeed's autocast inside the engine's forward: test_half_precision_keeps_fp32_weights...)
    assert PRECISIONS == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert "bf16" not in deepspeed_config(TrainConfig(precision="bf16"), 1)  # fp32 optimizer, no master copy


@dataclass(frozen=True)
class _Run:
    train: TrainConfig = field(default_factory=TrainConfig)


def test_param_groups_exclude_norms_biases_and_freeze():
    m = torch.nn.ModuleDict({"visual": torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)),
                             "text": torch.nn.Linear(3, 1)})
    freeze = FreezeSchedule(m, {"visual.": 5})
    groups, specs = param_groups(m, 0.05, freeze)
    assert specs == [(freeze.steps_of(g["params"][0]), 1.0) for g in groups]
    by = {(g["weight_decay"], freeze.steps_of(g["params"][0])): sum(p.numel() for p in g["params"]) for g in groups}
    assert by == {(0.05, 0): 3, (0.0, 0): 1, (0.05, 5): 6, (0.0, 5): 3 + 3 + 3}
    assert all(set(g) == {"params", "weight_decay"} for g in groups)  # plain torch groups
    freeze.apply(4)
    assert not m["visual"][0].weight.requires_grad and m["text"].weight.requires_grad
    freeze.apply(5)
    assert m["visual"][0].weight.requires_grad


def _another_port(taken: int) -> int:
    from launch.runtime.dist import free_port as find

    while (port := find()) == taken:
        pass
    return port


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, free_port):
    """1 x 8 (plain python), 1 x 4 x accum 2, deepspeed 2 ranks x 4 with ZeRO-2, and torchrun
    2 ranks x 4 all end equal."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    runs = {
        "one": [sys.executable, SCRIPT, str(tmp_path / "one")],
        "accum": [sys.executable, SCRIPT, str(tmp_path / "accum"), "train.micro_batch_size=4", "train.grad_accum=2"],
        "two": ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port), SCRIPT, str(tmp_path / "two"),
                "train.micro_batch_size=4", "train.zero_stage=2"],
        "torchrun": [torchrun if os.path.exists(torchrun) else "torchrun", "--nproc_per_node", "2",
                     "--master_port", str(_another_port(free_port)), SCRIPT,
                     str(tmp_path / "torchrun"), "train.micro_batch_size=4"],
    }
    # not from the repo root: the runtime must not depend on the working directory
    out = run_pairs({k: runs[k] for k in ("one", "accum")}, cwd=tmp_path)
    out.update({name: run(runs[name], cwd=tmp_path) for name in ("two", "torchrun")})
    final = {k: torch.load(tmp_path / k / "final.pt", weights_only=True) for k in runs}
    start = torch.nn.Sequential(torch.nn.Linear(6, 16))  # the weights did move
    for name in ("accum", "two", "torchrun"):
        for key, ref in final["one"].items():
            torch.testing.assert_close(final[name][key], ref, rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")
    assert (tmp_path / "two" / "config.yaml").is_file() and (tmp_path / "two" / "ds_config.json").is_file()
    assert final["one"]["0.weight"].abs().sum() != start[0].weight.abs().sum()
    # DeepSpeed's CPU all-reduce buffers (one per rank in /dev/shm) are released at the end
    from launch.runtime.engine import shm_buffer_path

    assert not [r for r in (0, 1) if os.path.exists(shm_buffer_path(r, "127.0.0.1", str(free_port)))]
    # telemetry: the gradient norm is that of the global batch, however it is split (our own
    # without ZeRO, DeepSpeed's with ZeRO-2); timings and memory are present and sane
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in runs}
    norms = {k: [r["train/grad_norm"] for r in v] for k, v in rows.items()}
    assert len(norms["one"]) == 6 and all(n > 0 for n in norms["one"])
    for name in ("accum", "two", "torchrun"):
        assert norms[name] == pytest.approx(norms["one"], rel=1e-4), name
    for r in rows["two"]:
        assert 0.0 <= r["train/data_wait_share"] <= 1.0 and r["train/step_time_s"] > 0
        assert r["train/peak_mem_gib"] > 0.01 and 0 < r["train/mfu"] < 1
    # stderr is a pipe, not a terminal: one plain progress line per log interval, no bar
    lines = [x for x in out["one"].stderr.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == [f"{i}/6" for i in range(1, 7)] and "\r" not in out["one"].stderr


def test_adamw_is_fused_where_supported():
    from launch.runtime.engine import adamw

    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw([{"params": [p]}], lr=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert opt.defaults["fused"] is True  # torch >= 2.4 has the fused kernel on CPU and CUDA
    p.grad = torch.full_like(p, 2.0)
    opt.step()
    # one AdamW step moves every weight by lr * sign(grad) (m_hat / sqrt(v_hat) = 1) after decay
    torch.testing.assert_close(p.detach(), torch.full((3,), 1.0 * (1 - 0.1 * 0.01) - 0.1))


def test_guard_spike_chance_and_temperature():
    from launch.runtime.config import GuardConfig
    from launch.runtime.guard import Diverged, Guard

    g = Guard(GuardConfig(loss_spike=10, window=3))
    for step, loss in enumerate([1.0, 0.9, 5.0, 0.8], 1):  # 5.0 is under 10x the median
        g.check(step, {"train/loss": loss})
    with pytest.raises(Diverged, match="over 10x its recent median 0.9"):
        g.check(5, {"train/loss": 9.5})  # median of the last 3 (0.9, 5.0, 0.8) is 0.9

    chance = 3.1192
    g = Guard(GuardConfig(chance_logs=3), chance=chance, settle_step=2)
    g.check(1, {"train/loss": chance})
    g.check(2, {"train/loss": chance})  # inside warmup / freezing: not counted
    g.check(3, {"train/loss": chance * 1.001})
    g.check(4, {"train/loss": chance * 0.9})  # learning: the count restarts
    g.check(5, {"train/loss": chance})
    g.check(6, {"train/loss": chance})
    with pytest.raises(Diverged, match="chance level 3.1192 for 3 logs"):
        g.check(7, {"train/loss": chance})
    restored = Guard(GuardConfig(chance_logs=3), chance=chance, settle_step=2)
    restored.load_state_dict(g.state_dict())
    assert restored.state_dict() == g.state_dict()

    with pytest.raises(Diverged, match="temperature 2 at step 1 is above guard.max_temperature=1"):
        Guard(GuardConfig()).check(1, {"train/loss": 3.0, "train/temperature": 2.0})
    Guard(GuardConfig(max_temperature=0, loss_spike=0)).check(1, {"train/loss": 3.0, "train/temperature": 2.0})


@pytest.mark.slow
def test_half_precision_keeps_fp32_weights_and_scales_fp16_losses(tmp_path, free_port):
    """bf16 and fp16 runs (DeepSpeed's torch autocast, here on the CPU): every parameter stays
    fp32, the engine's forward runs under the autocast policy of the device (Linear outputs half;
    LayerNorm as the policy says: fp32 on CUDA, half on CPUs), and the weights land near the fp32 run's. fp16 with an initial loss scale of 2**40 overflows: the
    scaler skips those steps and halves the scale, and the log says how many it skipped."""
    runs = {"fp32": [], "bf16": ["train.precision=bf16"], "fp16": ["train.precision=fp16", "train.fp16_initial_scale_power=8"],
            "fp16_overflow": ["train.precision=fp16", "train.fp16_initial_scale_power=22", "train.steps=12"]}
    # clipping (the script's grad_clip=1.0 binds: norms 1.06-1.7) of fp16 gradients under ZeRO-2: with
    # Adam's eps at 1 the update is not scale-free, so a threshold off by the loss scale would show
    clip = ["train.eps=1.0", "train.grad_clip=0.5"]
    run_pairs({**{name: [sys.executable, SCRIPT, str(tmp_path / name), *over] for name, over in runs.items()},
               "clip_fp32": [sys.executable, SCRIPT, str(tmp_path / "clip_fp32"), *clip]}, cwd=tmp_path)
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port), SCRIPT, str(tmp_path / "fp16_zero2"),
          "train.precision=fp16", "train.fp16_initial_scale_power=8", "train.micro_batch_size=4", "train.zero_stage=2"],
         cwd=tmp_path)
    runs["fp16_zero2"] = []
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(_another_port(free_port)), SCRIPT,
          str(tmp_path / "clip_fp16_zero2"), *clip, "train.precision=fp16", "train.fp16_initial_scale_power=8",
          "train.micro_batch_size=4", "train.zero_stage=2"], cwd=tmp_path)
    for key, ref in torch.load(tmp_path / "clip_fp32" / "final.pt", weights_only=True).items():
        got = torch.load(tmp_path / "clip_fp16_zero2" / "final.pt", weights_only=True)[key]
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-3, msg=key)
    final = {k: torch.load(tmp_path / k / "final.pt", weights_only=True) for k in runs}
    dtypes = {k: json.loads((tmp_path / k / "dtypes.json").read_text()) for k in runs}
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in runs}
    assert all(d["params"] == ["torch.float32"] for d in dtypes.values())
    assert dtypes["fp32"]["outputs"] == ["layernorm:torch.float32", "linear:torch.float32"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with torch.autocast("cpu", dtype=dtype):
            policy = torch.nn.LayerNorm(4)(torch.nn.Linear(4, 4)(torch.randn(2, 4))).dtype
        assert dtypes[name]["outputs"] == [f"layernorm:{policy}", f"linear:{dtype}"]
    # the first step (same weights, same batch): loss and gradient norm (the fp16 one unscaled) as fp32's
    first = {k: (r[0]["train/loss"], r[0]["train/grad_norm"]) for k, r in rows.items() if k != "fp16_overflow"}
    for name, tol in (("bf16", 2e-2), ("fp16", 2e-3), ("fp16_zero2", 2e-3)):
        assert first[name] == pytest.approx(first["fp32"], rel=tol), name
    assert "train/fp16_loss_scale" not in rows["bf16"][-1]
    assert rows["fp16"][-1]["train/fp16_skipped_steps_total"] == 0 and rows["fp16"][-1]["train/fp16_loss_scale"] == 256
    over = rows["fp16_overflow"]
    skipped = over[-1]["train/fp16_skipped_steps_total"]
    assert 1 <= skipped <= 9 and over[-1]["train/fp16_loss_scale"] == 2.0 ** (22 - skipped)
    assert "train/grad_norm" not in over[0]  # an overflowing step has no finite norm
    assert over[-1]["train/fp16_loss_scale"] == over[-3]["train/fp16_loss_scale"]  # settled: steps taken again
    assert all("train/grad_norm" in r for r in over[-3:])
    assert all(torch.isfinite(v).all() for v in final["fp16_overflow"].values())
