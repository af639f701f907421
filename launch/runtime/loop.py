"""The training loop shared by both stages, with what makes it resumable exactly.

A stage hands the :class:`Trainer` its engine, a :class:`launch.runtime.stream.BatchStream` and
its :class:`Step` (one optimizer step over ``train.grad_accum`` micro-batches); the trainer owns
everything else: the freeze schedule, the non-finite stop and the divergence guard, rank-averaged
logging and telemetry, checkpoints and periodic hooks. A checkpoint holds, per rank, the data
position, every random state and the logging counters, so a resumed run ends with the same
weights as one never stopped (same seed, ranks and workers).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch

from launch.runtime import checkpoints
from launch.runtime.config import ConfigError
from launch.runtime.dist import (Dist, all_ranks_true, all_reduce, barrier, fault_point, preserved_rng, rng_state,
                                 set_rng_state)
from launch.runtime.ema import EMA
from launch.runtime.engine import Engine, shutdown_distributed
from launch.runtime.guard import Diverged, Guard
from launch.runtime.monitor import Monitor
from launch.runtime.optim import FreezeSchedule, LRSchedule, global_batch
from launch.runtime.stream import BatchStream
from launch.runtime.telemetry import Telemetry, progress_line
from mae.common.files import WriteError

# A hook runs on every rank after steps divisible by its period (and after the last step), with the
# random states restored after it; what it returns on rank 0 is logged. The trainer waits for every
# rank after the hooks of a step.
Hook = tuple[int, Callable[[int], Optional[dict]]]


def to_device(x: Any, device: torch.device) -> Any:
    """Move a batch (tensors, lists, dicts) to the device, dtypes unchanged (the models cast their
    inputs to their weights' dtype, so losses can use the full-precision pixels)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def eager():
    """A context in which compiled modules run eagerly (torch >= 2.6; else nothing)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class Step:
    """One optimizer step of a stage. :meth:`forward` is one micro-batch's ``(loss, metrics)``;
    ``step(batches)`` runs the forward, backward and ``engine.step()`` of every micro-batch and
    returns the step's mean loss (detached) and metrics. Metrics named ``count/...`` (skipped
    samples, ...) are summed over ranks into running ``train/..._total``; the rest are averaged
    over micro-batches, ranks and the log interval. :meth:`after` runs after each optimizer step."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def __call__(self, batches: list[dict]) -> tuple[torch.Tensor, dict]:
        losses, metrics = [], {}
        for batch in batches:
            loss, m = self.forward(batch)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / (1 if k.startswith("count/") else len(batches))
        return torch.stack(losses).mean(), metrics

    def after(self) -> None:
        pass


class NonFiniteLoss(Diverged):
    pass


class Trainer:
    """Optimizer steps ``start .. train.steps - 1`` of one stage (see the module docstring).

    Args:
        cfg: the stage's run config (its ``train``, ``run`` and ``guard`` sections).
        dist: this process's place.
        engine, stream, step: the model's engine, the batches (their position is saved in
            checkpoints) and the stage's step.
        monitor: rank-0 logging.
        schedule: the lr schedule (for logging).
        freeze: the freeze schedule (applied before each step), if any.
        guard: the divergence guard, checked at every log.
        identity: name -> (fingerprint, hint): what a resume must match (model config, tokenizer).
    """

    def __init__(self, cfg: Any, dist: Dist, engine: Engine, stream: BatchStream, step: Step, monitor: Monitor,
                 schedule: LRSchedule, freeze: Optional[FreezeSchedule] = None, guard: Optional[Guard] = None,
                 identity: Optional[dict] = None):
        self.train, self.run, self.dist = cfg.train, cfg.run, dist
        self.engine, self.stream, self.step_fn, self.monitor = engine, stream, step, monitor
        self.schedule, self.freeze, self.guard = schedule, freeze, guard
        self.identity = identity or {}
        self.ema = EMA(engine.module, self.train.ema) if self.train.ema.decay > 0 and dist.is_main else None
        self.out_dir = monitor.out_dir
        self.step = 0
        self.acc: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.n_acc = 0
        n = stream.dataset.num_samples() if hasattr(stream.dataset, "num_samples") else None  # read once
        self.telemetry = Telemetry(self.train, dist, self.run.peak_tflops, n)

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint beyond DeepSpeed's."""
        t, d = self.train, self.dist
        return {"step": self.step, "world_size": d.world_size, "global_batch": global_batch(t, d.world_size),
                "batch": {"train.micro_batch_size": t.micro_batch_size, "train.grad_accum": t.grad_accum},
                "identity": {k: v[0] for k, v in self.identity.items()},
                "stream": self.stream.state_dict(), "rng": rng_state(), "engine": self.engine.state_dict(),
                "loop": {"acc": dict(self.acc), "counts": dict(self.counts), "totals": dict(self.totals),
                         "n_acc": self.n_acc},
                "guard": self.guard.state_dict() if self.guard else None,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def save(self) -> None:
        checkpoints.save(self.engine, self.out_dir, self.step, self.run.keep_last, self.dist, self.state_dict())

    def resume(self) -> int:
        """Continue from the newest usable checkpoint of the run folder; returns its step."""
        step, state = checkpoints.load(self.engine, self.out_dir, self.dist)
        self.step = step
        self.stream.load_state_dict(state["stream"])
        loop = state["loop"]
        self.acc, self.counts, self.totals, self.n_acc = loop["acc"], loop["counts"], loop["totals"], loop["n_acc"]
        self.engine.load_state_dict(state.get("engine") or _legacy_engine_state(step, state))
        if self.guard and state["guard"]:
            self.guard.load_state_dict(state["guard"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.monitor.truncate(step)
        return step

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self, hooks: Iterable[Hook] = ()) -> None:
        from tqdm import tqdm

        hooks = [(n, h) for n, h in hooks if n > 0]
        # a terminal gets a live bar; a file (a batch job's log) gets one plain line per log interval
        self.interactive = sys.stderr.isatty()
        bar = tqdm(total=self.train.steps, initial=self.step, disable=not (self.dist.is_main and self.interactive),
                   unit="step", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        self.telemetry.start()
        try:
            self._fit(hooks, bar)
        finally:
            bar.close()  # before any error line

    def _next(self) -> Any:
        """The next micro-batch on the device; the wait is the interval's data time."""
        t = time.perf_counter()
        batch = to_device(next(self.stream), self.dist.device)
        self.telemetry.add_data_time(time.perf_counter() - t)
        return batch

    def _fit(self, hooks, bar) -> None:
        train, dist, tel = self.train, self.dist, self.telemetry
        t_last = time.perf_counter()
        while self.step < train.steps:
            if self.freeze is not None:
                self.freeze.apply(self.step)
            logged = self._logs_after(self.step + 1)
            batches = [self._next() for _ in range(train.grad_accum)]
            if tel.flops_per_sample is None:  # an extra forward, once per process, that draws nothing
                with preserved_rng(), eager():  # and compiles nothing: the model's FLOPs, not a compiled graph's
                    tel.count(lambda: self.step_fn.forward(batches[0]), train.micro_batch_size, grad=False)
            self.engine.want_grad_norm = logged
            loss, metrics = self.step_fn(batches)
            self._record(loss, metrics, len(batches))
            tel.after_step(self.engine, logged)
            self.step_fn.after()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step)
            fault_point("step", self.step)
            bar.update(1)
            if logged:
                now = time.perf_counter()
                logs = self._log_row(now - t_last)
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}", sps=f"{logs['train/samples_per_s']:.1f}",
                                data=f"{100 * logs['train/data_wait_share']:.0f}%",
                                mfu=f"{100 * logs.get('train/mfu', float('nan')):.1f}%")
                if dist.is_main and not self.interactive:
                    print(progress_line(self.step, train.steps, logs), file=sys.stderr, flush=True)
                t_last = now
                if self.guard is not None:
                    self.guard.check(self.step, logs)  # before this step's checkpoint: the last one stays good
            if self.run.ckpt_every and self.step % self.run.ckpt_every == 0 and self.step < train.steps:
                self.save()
            due = [h for n, h in hooks if self.step % n == 0 or self.step == train.steps]
            for hook in due:
                with preserved_rng():  # evaluating or plotting must not change what training draws next
                    out = hook(self.step)
                if out:
                    self.monitor.log(self.step, out)
            if due:
                barrier(dist)

    def _record(self, loss: torch.Tensor, metrics: dict, micro_steps: int) -> None:
        """Stop on a non-finite loss (any rank); add the metrics of the step's ``micro_steps`` micro-batches."""
        if not all_ranks_true(bool(torch.isfinite(loss.detach().float()).all()), self.dist):
            raise NonFiniteLoss(f"non-finite loss at step {self.step} (loss={loss.item()}); stopping")
        for k, v in {"loss": loss.item(), **metrics}.items():
            if k.startswith("count/"):
                self.counts[k] = self.counts.get(k, 0.0) + float(v)
            else:  # averaged per micro-batch
                self.acc[k] = self.acc.get(k, 0.0) + float(v) * micro_steps
        self.n_acc += micro_steps

    def _log_row(self, seconds: float) -> dict:
        d = self.stream.dropped  # cumulative, per rank: what partial batches skipped and held
        dropped = all_reduce({"count/skipped_samples": d["n_skipped"], "count/broken_shards": d["n_broken_shards"],
                              "count/samples_in_partial_batches": d["samples"]}, self.dist, "sum")
        avg = all_reduce({k: v / self.n_acc for k, v in self.acc.items()}, self.dist, "mean")
        for k, v in all_reduce(self.counts, self.dist, "sum").items():
            self.totals[k] = self.totals.get(k, 0.0) + v
        logs = {f"train/{k}": v for k, v in avg.items()}
        running = {k: self.totals.get(k, 0.0) + dropped.get(k, 0.0) for k in {*self.totals, *dropped}}
        logs.update({f"train/{k.split('/', 1)[1]}_total": v for k, v in sorted(running.items())})
        if self.engine.loss_scale is not None:
            logs["train/fp16_skipped_steps_total"] = float(self.engine.fp16_skipped)
            logs["train/fp16_loss_scale"] = self.engine.loss_scale
        logs["train/lr"] = self.schedule.lr(self.step - 1)
        logs.update(self.telemetry.row(seconds, self.step, self.n_acc))
        self.monitor.log(self.step, logs)
        self.acc, self.counts, self.n_acc = {}, {}, 0
        return logs

    def _logs_after(self, step: int) -> bool:
        """Whether the row of a log interval is written after optimizer step ``step`` (1-based)."""
        return step % self.run.log_every == 0 or step == self.train.steps

    def skip_totals(self) -> dict[str, float]:
        """Every ``*_total`` count of the last logged row (for the end-of-run summary)."""
        rows = self.monitor.history()
        last = next((r for r in reversed(rows) if "train/loss" in r), {})
        return {k[len("train/"):-len("_total")]: v for k, v in last.items() if k.endswith("_total")}


def _legacy_engine_state(step: int, state: dict) -> dict:
    """The engine's state of a checkpoint written before it had one (the loop kept it then)."""
    loop = state.get("loop", {})
    return {"optimizer_steps": step, "fp16_skipped": loop.get("fp16_skipped", 0), "grad_scaler": state.get("grad_scaler")}


def run_main(main: Callable[[list[str]], Any], argv: Optional[list[str]] = None) -> None:
    """Call an entry point and then leave the process group. Configuration and input errors are one
    line on stderr and exit 2; a diverged run is one line and exit 3 (its last checkpoint intact)."""
    try:
        main(sys.argv[1:] if argv is None else argv)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank leaves while another still works or communicates
    except (ConfigError, FileNotFoundError, WriteError) as e:
        if os.environ.get("RANK", "0") == "0" or isinstance(e, WriteError):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        shutdown_distributed()
