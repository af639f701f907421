"""Run the shared training runtime on a tiny regression model (used by tests/test_runtime.py).

Every rank takes its slice of a fixed global batch per step, so 1 process x B and N processes x
B/N must end with the same weights. Usage: ``deepspeed --num_gpus N tests/scripts/dp_runtime.py
OUT_DIR [key=value ...]``.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

from launch.config import RunConfig, TrainConfig, load_config
from launch.dist import init_distributed, set_seed
from launch.loop import Trainer, prepare_run_dir, run_main
from launch.stream import BatchStream
from launch.monitor import Monitor
from launch.optim import build_engine


@dataclass(frozen=True)
class TinyRunConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=6, micro_batch_size=8, warmup_steps=2, lr=0.05, weight_decay=0.1, grad_clip=1.0, num_workers=0))
    run: RunConfig = field(default_factory=RunConfig)


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
    engine, ds, schedule = build_engine(model, cfg.train, dist)
    run_dir = prepare_run_dir(cfg.run, cfg, dist, {"ds_config.json": ds})
    gen = torch.Generator().manual_seed(123)
    global_b = cfg.train.micro_batch_size * dist.world_size
    n_micro = cfg.train.steps * cfg.train.grad_accum
    xs = torch.randn(n_micro, global_b, 6, generator=gen)
    ys = xs.sum(-1, keepdim=True).sin()

    def loader(epoch):  # this rank's contiguous slice of each global micro-batch
        lo, hi = dist.rank * cfg.train.micro_batch_size, (dist.rank + 1) * cfg.train.micro_batch_size
        return [(xs[i, lo:hi], ys[i, lo:hi]) for i in range(n_micro)]

    def step_fn(batch):
        x, y = batch
        return torch.nn.functional.mse_loss(engine(x), y), {}

    monitor = Monitor(run_dir, dist)
    stream = BatchStream(None, loader, cfg.train.micro_batch_size, 0)
    Trainer(engine, stream, step_fn, cfg.train, cfg.run, dist, monitor, schedule).fit()
    if dist.is_main:
        torch.save({k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}, Path(out) / "final.pt")
        import json

        (Path(out) / "dtypes.json").write_text(json.dumps({
            "params": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "outputs": sorted(f"{k}:{v}" for k, v in seen)}))
        monitor.close()


if __name__ == "__main__":
    run_main(main)
