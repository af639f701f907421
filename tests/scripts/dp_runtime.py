"""Run the shared training runtime on a tiny regression model (used by tests/test_runtime.py).

Every rank takes its slice of a fixed global batch per step, so 1 process x B and N processes x
B/N must end with the same weights. Usage: ``deepspeed --num_gpus N tests/scripts/dp_runtime.py
OUT_DIR [key=value ...]``.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launch.runtime.config import GuardConfig, RunConfig, TrainConfig, load_config
from launch.runtime.dist import set_seed
from launch.runtime.engine import Engine, init_distributed
from launch.runtime.loop import Step, Trainer, run_main
from launch.runtime.monitor import Monitor
from launch.runtime.optim import LRSchedule, param_groups
from launch.runtime.run_dir import prepare_run_dir
from launch.runtime.stream import BatchStream


@dataclass(frozen=True)
class TinyRunConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=6, micro_batch_size=8, warmup_steps=2, lr=0.05, weight_decay=0.1, grad_clip=1.0, num_workers=0))
    run: RunConfig = field(default_factory=RunConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


class RegressionStep(Step):
    def forward(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.engine(x), y), {}


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    out, overrides = argv[0], argv[1:]
    cfg = load_config(TinyRunConfig, None, overrides + [f"run.out_dir={out}", "run.log_every=1"])
    dist = init_distributed()
    set_seed(cfg.train.seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    seen = set()  # dtypes of the first Linear's and the LayerNorm's outputs in the training forwards
    model[0].register_forward_hook(lambda m, i, o: seen.add(("linear", str(o.dtype))))
    model[1].register_forward_hook(lambda m, i, o: seen.add(("layernorm", str(o.dtype))))
    groups, windows = param_groups(model, cfg.train.weight_decay)
    schedule = LRSchedule(cfg.train, dist.world_size, windows)
    engine = Engine(model, cfg.train, dist, groups, schedule)
    run_dir = prepare_run_dir(cfg.run, cfg, dist, {"ds_config.json": engine.config})
    gen = torch.Generator().manual_seed(123)
    global_b = cfg.train.micro_batch_size * dist.world_size
    n_micro = cfg.train.steps * cfg.train.grad_accum
    xs = torch.randn(n_micro, global_b, 6, generator=gen)
    ys = xs.sum(-1, keepdim=True).sin()

    def loader(epoch):  # this rank's contiguous slice of each global micro-batch
        lo, hi = dist.rank * cfg.train.micro_batch_size, (dist.rank + 1) * cfg.train.micro_batch_size
        return [(xs[i, lo:hi], ys[i, lo:hi]) for i in range(n_micro)]

    monitor = Monitor(run_dir, dist)
    stream = BatchStream(None, loader, cfg.train.micro_batch_size, 0)
    Trainer(cfg, dist, engine, stream, RegressionStep(engine), monitor, schedule).fit()
    if dist.is_main:
        torch.save({k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}, Path(out) / "final.pt")
        import json

        from launch.runtime.engine import shm_buffer_path

        (Path(out) / "shm.json").write_text(json.dumps({"0": os.path.exists(shm_buffer_path(0))}))
        (Path(out) / "dtypes.json").write_text(json.dumps({
            "params": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "outputs": sorted(f"{k}:{v}" for k, v in seen)}))
        monitor.close()


if __name__ == "__main__":
    run_main(main)
