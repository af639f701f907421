"""The process: the group it joins, where it stands, the few collectives the runtime needs, its
random states (saved in checkpoints, kept across hooks) and the test suite's fault points.

Works under ``deepspeed [--num_gpus N | --hostfile H] launch/X.py``, ``torchrun``, and a plain
``python launch/X.py`` (one process; the rendezvous variables are filled in here).
"""
from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import socket
import sys
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


def init_distributed() -> Dist:
    """Join the process group the launcher set up (or make a one-process group).

    The DeepSpeed launcher and torchrun export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. Without them this is a single process, and the variables are set here so that
    DeepSpeed does not go looking for MPI. The backend is the accelerator's (NCCL on CUDA, gloo
    or oneCCL on CPU).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local)
        device = torch.device(acc.device_name(local))
    return Dist(rank, world, local, device)


def shutdown_distributed() -> None:
    """Leave the process group, if any, and let its threads go while the interpreter still runs.

    Left to interpreter exit, the teardown of gloo's worker threads can abort a rank that finished
    correctly ("terminate called without an active exception", exit -6): a C++ thread that
    releases the last reference to a Python-owned tensor after finalisation began cannot take the
    GIL. So the engine's reference cycles (hooks, optimizer, loaders) are collected first, the
    groups destroyed, and DeepSpeed's own reference to the world group dropped, so that the C++
    process group, and with it its threads, is destroyed here, in order.
    """
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and getattr(groups, "_WORLD_GROUP", None) is not None:
        groups._WORLD_GROUP = None
    gc.collect()
    release_shm_buffer()


def shm_buffer_path(rank: int | str, addr: str | None = None, port: str | None = None) -> str:
    """Where DeepSpeed's CPU all-reduce keeps a rank's shared-memory buffer (its shm comm op, used
    when every rank is on one node): ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}``."""
    addr = addr or os.environ.get("MASTER_ADDR", "")
    port = port or os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer (about 66 MiB of RAM). DeepSpeed never
    does, so every finished CPU run left one per rank in /dev/shm: a session of test runs filled
    19 GiB of a 24 GiB machine. Called after the last collective: the peers' mappings stay valid."""
    if "RANK" in os.environ and "MASTER_PORT" in os.environ:
        with contextlib.suppress(OSError):
            os.unlink(shm_buffer_path(os.environ["RANK"]))


def fault_point(where: str, step: int) -> None:
    """Fault injection for the tests: ``ENKO_FAULT=where:step`` (e.g. ``step:5``, ``save:4``) kills
    this process with SIGKILL at that point, as a preemption would."""
    if os.environ.get("ENKO_FAULT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
