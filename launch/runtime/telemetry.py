"""What the training log says about speed, beyond the loss: per log interval, the share of time
spent waiting for data, step time, samples/s, MFU, peak memory, gradient norm and epoch.

:class:`Telemetry` is owned by :class:`launch.runtime.loop.Trainer`; it keeps only the current interval
(nothing here is checkpointed: timings restart with the process). Work it adds to a step is kept
off the hot path: FLOPs are counted once per process on the first micro-batch, the nominal epoch
size is read once, and the gradient norm is taken only on steps that are logged.
The text tower's work follows its captions' lengths (it runs on the real tokens only), so MFU is
an estimate at the first micro-batch's caption lengths.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import torch

from launch.runtime.dist import Dist, all_reduce
from launch.runtime.optim import global_batch
from launch.runtime.perf import peak_tflops


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: the accelerator's allocator peak, or on a CPU the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def progress_line(step: int, steps: int, logs: dict) -> str:
    """The plain progress line written when stderr is not a terminal (one per log interval)."""
    def g(k):
        return logs.get(f"train/{k}", float("nan"))
    epoch = f" epoch {g('epoch'):.2f}" if "train/epoch" in logs else ""
    return (f"step {step}/{steps}{epoch} loss {g('loss'):.4f} lr {g('lr'):.3g} {g('samples_per_s'):.1f} samples/s "
            f"step {g('step_time_s'):.3f}s data-wait {100 * g('data_wait_share'):.1f}% mfu {100 * g('mfu'):.2f}% "
            + (f"grad-norm {g('grad_norm'):.3g} " if "train/grad_norm" in logs else "")
            + f"peak-mem {g('peak_mem_gib'):.2f} GiB")


class Telemetry:
    """Timing, throughput and memory figures of one log interval.

    Args:
        train: the stage's train config (micro-batch, accumulation, ZeRO stage).
        dist: this process's place in the job.
        peak_override: ``run.peak_tflops`` (0: the device's own peak, see :func:`launch.runtime.perf.peak_tflops`).
        num_samples: the nominal epoch in samples (None: unknown, no ``train/epoch``).
    """

    def __init__(self, train, dist: Dist, peak_override: float = 0.0, num_samples: Optional[int] = None):
        self.train, self.dist, self.num_samples = train, dist, num_samples
        self.peak_override = peak_override
        self.peak: Optional[tuple[float, str]] = None
        self.flops_per_sample: Optional[float] = None  # forward x 3, counted on the first micro-batch
        self.reset()

    def start(self) -> None:
        """Measure or look up the device's peak (on a CPU a short GEMM probe)."""
        self.peak = peak_tflops(self.dist.device, self.peak_override or None)

    def reset(self) -> None:
        self.t_data, self.steps, self.grad_norm = 0.0, 0, None

    def add_data_time(self, seconds: float) -> None:
        self.t_data += seconds

    def count(self, fn: Callable[[], Any], batch_size: int, grad: bool = True) -> Any:
        """Run ``fn`` (a forward), counting its FLOPs once per process (x 3 for the backward); with
        ``grad=False`` only to count (no graph, nothing returned once counted)."""
        if self.flops_per_sample is not None:
            return fn() if grad else None
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        try:
            with counter, (contextlib.nullcontext() if grad else torch.no_grad()):
                out = fn()
            self.flops_per_sample = 3.0 * counter.get_total_flops() / max(1, batch_size)
        except Exception:  # a compiled graph the counter cannot follow: no MFU, training goes on
            self.flops_per_sample = float("nan")
            out = fn() if grad else None
        return out

    def after_step(self, engine, logged: bool) -> None:
        """Count an optimizer step; on a logged one keep the engine's gradient norm of that step
        (unscaled; None after an fp16 overflow)."""
        self.steps += 1
        if logged and engine.grad_norm is not None:
            self.grad_norm = float(engine.grad_norm)

    def row(self, seconds: float, step: int, micro_batches: int) -> dict:
        """The interval's figures (every rank calls this: it reduces over ranks)."""
        t, d = self.train, self.dist
        logs: dict[str, float] = {}
        sps = micro_batches * t.micro_batch_size * d.world_size / max(seconds, 1e-9)
        logs["train/samples_per_s"] = sps
        timing = all_reduce({"data_wait_share": self.t_data / max(seconds, 1e-9),
                             "grad_norm": self.grad_norm if self.grad_norm is not None else float("nan")}, d, "mean")
        logs["train/data_wait_share"] = timing["data_wait_share"]  # mean over ranks
        logs["train/step_time_s"] = seconds / max(1, self.steps)
        if math.isfinite(timing["grad_norm"]):
            logs["train/grad_norm"] = timing["grad_norm"]
        logs["train/peak_mem_gib"] = all_reduce({"m": peak_memory_gib(d.device)}, d, "max")["m"]
        if self.num_samples:
            logs["train/epoch"] = step * global_batch(t, d.world_size) / self.num_samples
        peak, _ = self.peak or (float("nan"), "")
        mfu = (self.flops_per_sample or float("nan")) * sps / d.world_size / (peak * 1e12)
        if math.isfinite(mfu):
            logs["train/mfu"] = mfu
        self.reset()
        return logs
