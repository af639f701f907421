"""The training loop shared by both stages, its run folder and its DeepSpeed checkpoints.

A stage hands :func:`train_loop` its engine, an endless batch iterator and a ``step_fn(batch) ->
(loss, metrics)`` for one micro-batch; the loop owns everything else: backward and step per
micro-batch (DeepSpeed applies the optimizer at accumulation boundaries), the freeze schedule,
the non-finite stop, rank-averaged logging, checkpoints and periodic hooks.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from launch.config import ConfigError, RunConfig, TrainConfig, save_config
from launch.dist import Dist, all_ranks_true, all_reduce, barrier, shutdown_distributed
from launch.monitor import Monitor
from launch.optim import FreezeSchedule, LRSchedule, global_batch, model_dtype
from mae.checkpoint import atomic_write_text

# A hook runs on every rank after steps divisible by its period (and after the last step), with the
# random states restored after it; what it returns on rank 0 is logged. The loop waits for every
# rank after the hooks of a step.
Hook = tuple[int, Callable[[int], Optional[dict]]]


class NonFiniteLoss(RuntimeError):
    pass


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


def to_device(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a batch (tensors, lists, dicts) to the device; floating tensors take the model dtype."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype=dtype, non_blocking=True) if x.is_floating_point() else x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, dtype) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    return x


def infinite_batches(make_loader: Callable[[int], Iterable], start_epoch: int = 0) -> Iterator:
    """Endless batches, epoch after epoch: ``make_loader(epoch)`` builds each epoch's loader."""
    epoch = start_epoch
    while True:
        n = 0
        for batch in make_loader(epoch):
            n += 1
            yield batch
        if n == 0:
            raise ConfigError("the data source yielded no batch for this rank (too few samples for the batch size?)")
        epoch += 1


def epochs_done(step: int, num_samples: Optional[int], train: TrainConfig, dist: Dist) -> int:
    """Whole epochs consumed by ``step`` optimizer steps (0 if the source size is unknown): a resumed
    run starts its data at the next epoch's shuffle instead of replaying the first batches."""
    if not num_samples or step == 0:
        return 0
    return step * global_batch(train, dist.world_size) // num_samples


def save_checkpoint(engine, out_dir: Path, step: int, keep_last: int, dist: Dist) -> None:
    """DeepSpeed checkpoint (for ``--resume``) under ``checkpoints/step_XXXXXXX``; DeepSpeed writes
    the ``latest`` pointer only after every rank has written its files, so a crash mid-save leaves the
    previous checkpoint current. Older tags beyond ``keep_last`` are deleted."""
    ckpt = Path(out_dir) / "checkpoints"
    engine.save_checkpoint(str(ckpt), tag=f"step_{step:07d}", client_state={"step": step})
    barrier(dist)
    if dist.is_main and keep_last > 0:
        tags = sorted(p for p in ckpt.glob("step_*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def resume_checkpoint(engine, out_dir: Path) -> int:
    """Load the latest DeepSpeed checkpoint of the run; returns the step to continue from."""
    ckpt = Path(out_dir) / "checkpoints"
    if not (ckpt / "latest").is_file():
        raise ConfigError(f"--resume: no checkpoint in {ckpt} (no 'latest' file)")
    path, client = engine.load_checkpoint(str(ckpt))
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load the checkpoint in {ckpt}")
    # The optimizer state brings back the lr of the saved step under the old schedule (0 at the end
    # of a finished cosine); recompute it from this run's schedule, which may have more steps.
    sched = engine.lr_scheduler
    sched.last_epoch -= 1
    sched.step()
    return int(client.get("step", 0))


def train_loop(
    engine,
    batches: Iterator,
    step_fn: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    train: TrainConfig,
    run: RunConfig,
    dist: Dist,
    monitor: Monitor,
    schedule: LRSchedule,
    freeze: Optional[FreezeSchedule] = None,
    start_step: int = 0,
    hooks: Iterable[Hook] = (),
) -> None:
    """Run optimizer steps ``start_step .. train.steps - 1``.

    ``step_fn(batch)`` runs the forward of one micro-batch (already on the device in the model
    dtype) and returns ``(loss, metrics)``. Metrics named ``count/...`` (skipped samples, ...) are
    summed over ranks into running ``train/..._total``; the rest are averaged over ranks and over
    the log interval. Every ``run.log_every`` steps: a row of ``metrics.jsonl`` and the progress bar.
    Stops with :class:`NonFiniteLoss` when the loss is not finite on any rank.
    """
    from tqdm import tqdm

    hooks = [(n, h) for n, h in hooks if n > 0]
    dtype = model_dtype(train)
    bar = tqdm(total=train.steps, initial=start_step, disable=not dist.is_main, dynamic_ncols=True,
               unit="step", file=sys.stderr, mininterval=1.0)
    acc: dict[str, float] = {}
    counts: dict[str, float] = {}
    totals: dict[str, float] = {}
    n_acc, t_last = 0, time.perf_counter()
    for step in range(start_step, train.steps):
        if freeze is not None:
            freeze.apply(step)
        for _ in range(train.grad_accum):
            loss, metrics = step_fn(to_device(next(batches), dist.device, dtype))
            engine.backward(loss)
            engine.step()
            if not all_ranks_true(bool(torch.isfinite(loss.detach().float()).all()), dist):
                bar.close()
                raise NonFiniteLoss(f"non-finite loss at step {step} (loss={loss.item()}); stopping")
            for k, v in {"loss": loss.item(), **metrics}.items():
                bucket = counts if k.startswith("count/") else acc
                bucket[k] = bucket.get(k, 0.0) + float(v)
            n_acc += 1
        done = step + 1
        bar.update(1)
        if done % run.log_every == 0 or done == train.steps:
            now = time.perf_counter()
            avg = all_reduce({k: v / n_acc for k, v in acc.items()}, dist, "mean")
            for k, v in all_reduce(counts, dist, "sum").items():
                totals[k] = totals.get(k, 0.0) + v
            logs = {f"train/{k}": v for k, v in avg.items()}
            logs.update({f"train/{k.split('/', 1)[1]}_total": v for k, v in sorted(totals.items())})
            logs["train/lr"] = schedule.lr(step)
            logs["train/samples_per_s"] = n_acc * train.micro_batch_size * dist.world_size / max(now - t_last, 1e-9)
            monitor.log(done, logs)
            bar.set_postfix(loss=f"{avg['loss']:.4f}", sps=f"{logs['train/samples_per_s']:.1f}")
            acc, counts, n_acc, t_last = {}, {}, 0, now
        if run.ckpt_every and done % run.ckpt_every == 0 and done < train.steps:
            save_checkpoint(engine, monitor.out_dir, done, run.keep_last, dist)
        due = [h for n, h in hooks if done % n == 0 or done == train.steps]
        for hook in due:
            with preserved_rng():  # evaluating or plotting must not change what training draws next
                out = hook(done)
            if out:
                monitor.log(done, out)
        if due:
            barrier(dist)
    bar.close()


@contextlib.contextmanager
def preserved_rng():
    """Restore the python, numpy and torch (CPU and current accelerator) random states on exit."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


def run_main(main: Callable[[list[str]], Any], argv: Optional[list[str]] = None) -> None:
    """Call an entry point and then leave the process group; configuration and input errors are
    one line on stderr and exit 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank leaves while another still works or communicates
    except (ConfigError, FileNotFoundError, NonFiniteLoss) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()
