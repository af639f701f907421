"""The training loop shared by both stages, with what makes it resumable exactly.

A stage builds a :class:`Trainer` from its engine, a :class:`launch.stream.BatchStream` and a
``step_fn(batch) -> (loss, metrics)`` for one micro-batch; the trainer owns everything else:
backward and step per micro-batch (DeepSpeed applies the optimizer at accumulation boundaries),
the freeze schedule, the non-finite stop and the divergence guard, rank-averaged logging,
checkpoints and periodic hooks. A checkpoint holds, per rank, the data position, every random
state and the logging counters, so a resumed run ends with the same weights as one never
stopped (same seed, ranks and workers).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from launch import checkpoints
from launch.config import ConfigError, RunConfig, StreamConfig, TrainConfig, save_config
from launch.dist import (Dist, all_ranks_true, all_reduce, barrier, fault_point, preserved_rng, rng_state,
                         set_rng_state, shutdown_distributed)
from launch.guard import Diverged, Guard
from launch.monitor import Monitor
from launch.optim import FreezeSchedule, LRSchedule, autocast, clip_at_loss_scale, global_batch, grad_scaler
from launch.stream import BatchStream
from launch.telemetry import Telemetry, progress_line
from mae.checkpoint import atomic_write_text

# A hook runs on every rank after steps divisible by its period (and after the last step), with the
# random states restored after it; what it returns on rank 0 is logged. The trainer waits for every
# rank after the hooks of a step.
Hook = tuple[int, Callable[[int], Optional[dict]]]


def check_run_dir(out_dir: str, resume: bool) -> Path:
    """Refuse, before any process work, an output folder that cannot be written, one that holds a
    run when ``--resume`` is not given (a restart must never overwrite a run), and ``--resume``
    into a folder without checkpoints."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f".write_test.{os.getpid()}", "w") as f:
            f.write("ok")
        os.unlink(out / f".write_test.{os.getpid()}")
    except OSError as e:
        raise ConfigError(f"run.out_dir={out_dir}: cannot write there ({e.strerror or e})") from None
    existing = checkpoints.describe_run(out)
    if not resume and existing:
        raise ConfigError(f"run.out_dir={out_dir} already holds a run ({existing}); continue it with --resume, "
                          "or choose another run.out_dir")
    if resume and not checkpoints.tags_by_step(out / "checkpoints"):
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    return out


def check_source(source, key: str, stream: Optional[StreamConfig] = None):
    """The data source resolved (``mae.data.resolve_source``), or one line naming ``key``: missing,
    empty, a bad manifest line, (for files) none of its first images on disk, or ``stream``
    settings the source cannot take (resampling and weights need shards, one weight per ``::`` source)."""
    from mae.data import resolve_source

    try:
        kind, items = resolve_source(source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if stream is not None and stream.resampled and kind != "shards":
        raise ConfigError(f"data.resampled=true draws shards with replacement: {key} must be WebDataset shards")
    if stream is not None and stream.source_weights:
        n = len(str(source).split("::")) if kind == "shards" else 0
        if not stream.resampled:
            raise ConfigError("data.source_weights weigh shard draws: they need data.resampled=true")
        if len(stream.source_weights) != n:
            raise ConfigError(f"data.source_weights has {len(stream.source_weights)} weights for {n} "
                              f"'::'-separated sources in {key}")
    if kind == "records" and items:
        head = items[:1000]
        if not any(os.path.isfile(r["path"]) for r in head):
            raise ConfigError(f"{key}: none of the first {len(head)} images exists (e.g. {head[0]['path']})")
    return kind, items


def fingerprint(cfg: Any) -> str:
    """First 16 hex digits of the sha256 of a config (as sorted JSON)."""
    import hashlib

    from launch.config import to_dict

    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def summary_line(totals: dict[str, float]) -> str:
    """The run's data counts for the console: skipped samples, broken shards, partial batches."""
    names = {"skipped_samples": "samples skipped (missing, undecodable or without a caption)",
             "broken_shards": "broken shards", "samples_in_partial_batches": "samples in partial batches (not trained on)",
             "dropped_captions": "captions dropped (empty or invalid)"}
    return "data: " + ", ".join(f"{int(totals.get(k, 0))} {v}" for k, v in names.items() if k in totals or k != "dropped_captions")


def prepare_run_dir(run: RunConfig, cfg: Any, dist: Dist, extra: Optional[dict] = None) -> Path:
    """Create ``run.out_dir`` on rank 0 with ``config.yaml``, ``checkpoints/`` and the JSON files of
    ``extra`` (name -> object, e.g. ``ds_config.json``)."""
    out = Path(run.out_dir)
    if dist.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        for name, obj in (extra or {}).items():
            atomic_write_text(out / name, json.dumps(obj, indent=2, ensure_ascii=False))
    barrier(dist)
    return out


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


class NonFiniteLoss(Diverged):
    pass


class Trainer:
    """Optimizer steps ``start .. train.steps - 1`` of one stage (see the module docstring).

    Args:
        engine: the DeepSpeed engine.
        stream: the batches (their position is saved in checkpoints).
        step_fn: ``batch -> (loss, metrics)`` for one micro-batch already on the device; it runs
            under :func:`launch.optim.autocast`. Metrics named ``count/...`` (skipped samples, ...) are summed over ranks
            into running ``train/..._total``; the rest are averaged over ranks and the log interval.
        schedule, freeze: the lr schedule (for logging) and the freeze schedule (applied per step).
        guard: the divergence guard, checked at every log.
        identity: name -> (fingerprint, hint): what a resume must match (model config, tokenizer).
        whole_step: ``batches -> (loss, metrics)`` doing the backward and ``engine.step()`` of all
            ``train.grad_accum`` micro-batches of a step itself (feature-cached accumulation), used
            instead of ``step_fn`` when given (its forwards run under :func:`launch.optim.autocast` itself).
        after_step: called on every rank after each optimizer step (e.g. to clamp a parameter).
    """

    def __init__(self, engine, stream: BatchStream, step_fn: Callable[[Any], tuple[torch.Tensor, dict]],
                 train: TrainConfig, run: RunConfig, dist: Dist, monitor: Monitor, schedule: LRSchedule,
                 freeze: Optional[FreezeSchedule] = None, guard: Optional[Guard] = None,
                 identity: Optional[dict] = None, whole_step: Optional[Callable[[list], tuple]] = None,
                 after_step: Optional[Callable[[], None]] = None):
        self.engine, self.stream, self.step_fn, self.whole_step = engine, stream, step_fn, whole_step
        self.after_step = after_step
        self.train, self.run, self.dist, self.monitor = train, run, dist, monitor
        self.schedule, self.freeze, self.guard = schedule, freeze, guard
        self.identity = identity or {}
        self.out_dir = monitor.out_dir
        self.step = 0
        self.acc: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.n_acc = 0
        self.scaler = grad_scaler(engine)  # fp16: DeepSpeed's loss scaler (its state is checkpointed here)
        self.fp16_skipped = 0  # optimizer steps the scaler skipped (overflow)
        n = stream.dataset.num_samples() if hasattr(stream.dataset, "num_samples") else None  # read once
        self.telemetry = Telemetry(train, dist, run.peak_tflops, n)

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's part of a checkpoint beyond DeepSpeed's."""
        t, d = self.train, self.dist
        return {"step": self.step, "world_size": d.world_size, "global_batch": global_batch(t, d.world_size),
                "batch": {"train.micro_batch_size": t.micro_batch_size, "train.grad_accum": t.grad_accum},
                "identity": {k: v[0] for k, v in self.identity.items()},
                "stream": self.stream.state_dict(), "rng": rng_state(),
                "loop": {"acc": dict(self.acc), "counts": dict(self.counts), "totals": dict(self.totals),
                         "n_acc": self.n_acc, "fp16_skipped": self.fp16_skipped},
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "guard": self.guard.state_dict() if self.guard else None}

    def save(self) -> None:
        checkpoints.save(self.engine, self.out_dir, self.step, self.run.keep_last, self.dist, self.state_dict())

    def resume(self) -> int:
        """Continue from the newest usable checkpoint of the run folder; returns its step."""
        step, state = checkpoints.load(self.engine, self.out_dir, self.dist, self.identity)
        self.step = step
        self.stream.load_state_dict(state["stream"])
        loop = state["loop"]
        self.acc, self.counts, self.totals, self.n_acc = loop["acc"], loop["counts"], loop["totals"], loop["n_acc"]
        self.fp16_skipped = loop.get("fp16_skipped", 0)
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.guard and state["guard"]:
            self.guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
        self.monitor.truncate(step)
        return step

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self, hooks: Iterable[Hook] = ()) -> None:
        from tqdm import tqdm

        train, dist = self.train, self.dist
        hooks = [(n, h) for n, h in hooks if n > 0]
        # a terminal gets a live bar; a file (a batch job's log) gets one plain line per log interval
        self.interactive = sys.stderr.isatty()
        bar = tqdm(total=train.steps, initial=self.step, disable=not (dist.is_main and self.interactive), unit="step",
                   file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        self.telemetry.start()
        t_last = time.perf_counter()
        try:
            self._fit(hooks, bar, t_last)
        finally:
            bar.close()  # before any error line

    def _next(self) -> Any:
        """The next micro-batch on the device; the wait is the interval's data time."""
        t = time.perf_counter()
        batch = to_device(next(self.stream), self.dist.device)
        self.telemetry.add_data_time(time.perf_counter() - t)
        return batch

    def _fit(self, hooks, bar, t_last) -> None:
        train, dist = self.train, self.dist
        while self.step < train.steps:
            if self.freeze is not None:
                self.freeze.apply(self.step)
            logged = self._logs_after(self.step + 1)
            tel = self.telemetry
            scale = self.scaler.get_scale() if self.scaler is not None else None
            if scale is not None:
                clip_at_loss_scale(self.engine, train, scale)
            if self.whole_step is not None:  # one call does every micro-batch's backward and step
                batches = [self._next() for _ in range(train.grad_accum)]
                if tel.flops_per_sample is None:  # an extra forward, once, that draws nothing
                    with preserved_rng(), autocast(train, dist.device):
                        tel.count(lambda: self.step_fn(batches[0]), train.micro_batch_size, grad=False)
                self._record(*self.whole_step(batches), micro_steps=train.grad_accum)
                tel.after_step(self.engine, logged, loss_scale=scale or 1.0)
            else:
                for _ in range(train.grad_accum):
                    batch = self._next()
                    with autocast(train, dist.device):
                        loss, metrics = tel.count(lambda: self.step_fn(batch), train.micro_batch_size)
                    self.engine.backward(loss)
                    own = tel.own_grad_norm(self.engine, logged, scale or 1.0)
                    self.engine.step()
                    self._record(loss, metrics)
                tel.after_step(self.engine, logged, own, loss_scale=scale or 1.0)
            if scale is not None and self.scaler.get_scale() < scale:  # overflow: the scaler skipped the step
                self.fp16_skipped += 1
            if self.after_step is not None:
                self.after_step()
            self.step += 1
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

    def _record(self, loss: torch.Tensor, metrics: dict, micro_steps: int = 1) -> None:
        """Stop on a non-finite loss (any rank); add the metrics of ``micro_steps`` micro-batches."""
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
        if self.scaler is not None:
            logs["train/fp16_skipped_steps_total"] = float(self.fp16_skipped)
            logs["train/fp16_loss_scale"] = float(self.scaler.get_scale())
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


def run_main(main: Callable[[list[str]], Any], argv: Optional[list[str]] = None) -> None:
    """Call an entry point and then leave the process group. Configuration and input errors are one
    line on stderr and exit 2; a diverged run is one line and exit 3 (its last checkpoint intact)."""
    try:
        main(sys.argv[1:] if argv is None else argv)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank leaves while another still works or communicates
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        shutdown_distributed()
