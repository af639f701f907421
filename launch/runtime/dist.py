"""The process: where it stands in the job, the few collectives the runtime needs, its random
states (saved in checkpoints, kept across hooks) and the test suite's fault points. Joining and
leaving the process group is DeepSpeed's (:mod:`launch.runtime.engine`)."""
from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on localhost now, for a launcher's rendezvous (``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fault_point(where: str, step: int) -> None:
    """Fault injection for the tests: ``ENKO_FAULT=where:step`` (e.g. ``step:5``, ``save:4``) kills
    this process with SIGKILL at that point, as a preemption would; ``where:step:enospc`` raises the
    error a full disk gives there instead."""
    fault = os.environ.get("ENKO_FAULT", "")
    if fault == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"{where}:{step}:enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (callers add the rank where streams must differ per rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


def all_reduce(values: dict[str, float], dist: Dist, op: str = "mean") -> dict[str, float]:
    """Sum, mean or max (``op``) of scalar metrics over ranks, in one collective."""
    if dist.world_size == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    if op == "mean":
        t /= dist.world_size
    return dict(zip(keys, t.tolist()))


def all_ranks_true(flag: bool, dist: Dist) -> bool:
    """True when ``flag`` holds on every rank (a MIN all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def rng_state() -> dict:
    """Every random state of this process (python, numpy, torch CPU and accelerator), as tensors
    and plain values that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Restore every random state of this process on exit."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
