"""Run reporting: the start-of-run echo, TensorBoard (scalars, config text, hyperparameters,
images) and the optional Weights & Biases logger (a recording stand-in: wandb is not a dependency)."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from PIL import Image

from launch.runtime.config import ConfigError, RunConfig, TrainConfig
from launch.runtime.dist import Dist
from launch.runtime.monitor import Monitor, parameter_counts

MAIN = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _cfg():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Run:
        train: TrainConfig = field(default_factory=TrainConfig)
        run: RunConfig = field(default_factory=RunConfig)

    return Run()


def _model():
    m = torch.nn.ModuleDict({"visual": torch.nn.Linear(4, 3), "text": torch.nn.Linear(2, 2)})
    m["text"].weight.requires_grad_(False)
    return m


def test_parameter_counts():
    assert parameter_counts(_model()) == {"visual": 15, "text": 6, "total": 21, "trainable": 17}


def test_start_echo_and_tensorboard_records(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = Monitor(tmp_path, MAIN)
    mon.start(_cfg(), _model())
    out = capsys.readouterr().out
    assert f"config ({tmp_path / 'config.yaml'}):" in out and "micro_batch_size:" in out
    assert "parameters: visual 0.00M, text 0.00M, total 0.00M, trainable 0.00M" in out
    mon.log(3, {"train/loss": 1.5, "train/data_wait_share": 0.25})
    png = tmp_path / "grid.png"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(png)
    mon.image("mae/reconstructions", png, 3)
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert [e.value for e in acc.Scalars("train/data_wait_share")] == [0.25]
    img = acc.Images("mae/reconstructions")[0]
    assert (img.step, img.width, img.height) == (3, 8, 6)
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_wandb_logs_offline_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.config = types.SimpleNamespace(update=lambda d, allow_val_change: calls.append(("config", d)))
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda d, step: calls.append(("log", step, sorted(d)))
    fake.Image = lambda arr: ("image", arr.shape)
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)

    mon = Monitor(tmp_path, MAIN, wandb=True)
    mon.start(_cfg(), _model())
    mon.log(2, {"train/loss": 1.0, "train/mfu": 0.3})
    mon.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["id"] == "abc123" and init["dir"] == str(tmp_path)
    config = dict(calls[1][1])
    assert config["train.micro_batch_size"] == TrainConfig().micro_batch_size and config["params/total"] == 21
    assert calls[2] == ("log", 2, ["train/loss", "train/mfu"]) and calls[-1] == ("finish",)
    fake.util.generate_id = lambda: "other"
    Monitor(tmp_path, MAIN, resume=True, wandb=True)  # a resumed job continues the same W&B run
    assert calls[-1][1]["id"] == "abc123"

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        Monitor(tmp_path / "x", MAIN, wandb=True)


def test_telemetry_interval_figures():
    """One interval's row: samples/s, step time, data-wait share, epoch and MFU from the counted
    FLOPs; the gradient norm of a logged step (the engine's: our own pass over the gradients without
    ZeRO); the interval resets after its row."""
    from launch.runtime.engine import grad_norm
    from launch.runtime.telemetry import Telemetry

    model = torch.nn.Linear(8, 4, bias=False)
    model(torch.ones(2, 8)).sum().backward()

    class Engine:  # what the engine holds after a logged step (launch.runtime.engine.Engine.step)
        grad_norm = None

    train = TrainConfig(micro_batch_size=4, grad_accum=2)
    tel = Telemetry(train, MAIN, peak_override=1.0, num_samples=80)
    tel.start()
    assert tel.peak == (1.0, "--peak-tflops")
    x = torch.ones(4, 8)
    tel.count(lambda: model(x), batch_size=4)
    assert tel.flops_per_sample == pytest.approx(3 * 2 * 8 * 4)  # 3 x (2 * in * out) per sample
    own = grad_norm(model)
    assert own == pytest.approx(float(model.weight.grad.norm())) and grad_norm(model, 2.0) == pytest.approx(own / 2)
    Engine.grad_norm = 123.0  # an unlogged step's norm is not read
    for _ in range(2):
        tel.add_data_time(0.25)
        tel.after_step(Engine(), logged=False)
    Engine.grad_norm = own
    tel.after_step(Engine(), logged=True)
    row = tel.row(seconds=2.0, step=10, micro_batches=6)  # 3 steps x 2 micro-batches of 4
    assert row["train/samples_per_s"] == pytest.approx(12.0)
    assert row["train/step_time_s"] == pytest.approx(2.0 / 3)
    assert row["train/data_wait_share"] == pytest.approx(0.25)
    assert row["train/grad_norm"] == pytest.approx(own)
    assert row["train/epoch"] == pytest.approx(10 * 8 / 80)
    assert row["train/mfu"] == pytest.approx(3 * 2 * 8 * 4 * 12.0 / 1e12)
    assert (tel.t_data, tel.steps, tel.grad_norm) == (0.0, 0, None)
