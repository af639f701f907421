"""DeepSpeed behind one door: the only module that imports ``deepspeed``.

Everything the runtime asks of DeepSpeed goes through here: joining and leaving the process
group, the engine (``deepspeed.initialize`` with torch's AdamW, the precision, ZeRO, gradient
accumulation and clipping of ``train:``), its checkpoints, and the fp32 master copy of a parameter.
Where DeepSpeed has no public way to do what a run needs, the private attribute or behaviour used
is named in :data:`PRIVATE`, and a test fails if a DeepSpeed release changes it
(``tests/test_engine.py``; the fp16 behaviour also ``tests/test_runtime.py``):

* fp16 loss scaling: DeepSpeed builds the ``torch.amp.GradScaler`` of its ``torch_autocast`` section
  with torch's defaults and no config keys; ours (``train.fp16_initial_scale_power``,
  ``fp16_loss_scale_window``) replaces it where DeepSpeed keeps it;
* gradient clipping under fp16 with ZeRO 1/2: the ZeRO optimizer clips the gradients while they
  still carry the GradScaler's scale, so its threshold is set to ``grad_clip x scale`` before
  each step (otherwise it clips about ``scale`` times too hard);
* Adam moments from the end of a freeze window: the ZeRO 1/2 optimizer updates the moments of
  every group at every step (its flat partitions get zero gradients while frozen); the torch
  optimizer under it (``engine.optimizer.optimizer``, one flat partition per group, in our order)
  has the state of a group leaving its window dropped, so its moments start there;
* leaving the process group: DeepSpeed keeps its own reference to the world group, which keeps
  the C++ group (and gloo's threads) alive into interpreter shutdown, where they can abort a rank
  that finished correctly; and its CPU all-reduce keeps a shared-memory buffer per rank in
  ``/dev/shm`` that it never removes.

Half precision is DeepSpeed's ``torch_autocast`` over fp32 weights (as open_clip's ``amp``):
every parameter stays fp32, the engine's forward runs under ``torch.autocast``; the learning rate
of each optimizer group is set here at every optimizer step from the run's schedule (no
DeepSpeed scheduler: a resumed run's rates are a function of the step, nothing to restore).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
from typing import Any, Optional

import torch
from torch import nn

from launch.runtime.config import TrainConfig
from launch.runtime.dist import Dist, free_port

# precision -> the dtype the engine's forward is autocast to (None: fp32). Weights, gradients and
# the optimizer state are fp32 in every case.
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRIVATE = {
    "engine.torch_autocast_z0_gradscaler": "the fp16 GradScaler without ZeRO",
    "engine.optimizer.torch_autocast_gradscaler": "the fp16 GradScaler under ZeRO 1/2",
    "engine.optimizer.clip_grad": "the ZeRO optimizer's clipping threshold",
    "deepspeed.utils.groups._WORLD_GROUP": "DeepSpeed's reference to the world group",
    "engine.optimizer.optimizer": "the torch optimizer under the ZeRO 1/2 wrapper, one flat partition per group",
    "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}": "its CPU all-reduce buffer",
}


# ----------------------------------------------------------------------------- the process group
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
    """Leave the process group, if any, and let its threads go while the interpreter still runs
    (see the module docstring): the engine's reference cycles collected, the groups destroyed,
    DeepSpeed's reference to the world group dropped, this rank's shared-memory buffer unlinked
    (after the last collective: the peers' mappings stay valid)."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and getattr(groups, "_WORLD_GROUP", None) is not None:
        groups._WORLD_GROUP = None
    gc.collect()
    if "RANK" in os.environ and "MASTER_PORT" in os.environ:
        with contextlib.suppress(OSError):
            os.unlink(shm_buffer_path(os.environ["RANK"]))


def shm_buffer_path(rank: int | str, addr: str | None = None, port: str | None = None) -> str:
    """Where DeepSpeed's CPU all-reduce keeps a rank's shared-memory buffer (its shm comm op, used
    when every rank is on one node)."""
    addr = addr or os.environ.get("MASTER_ADDR", "")
    port = port or os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


# ----------------------------------------------------------------------------- the engine
def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config of a run (saved as ``ds_config.json`` in the run folder).
    ``lower_precision_safe_modules: []`` keeps gradient communication in fp32 (DeepSpeed's default
    would all-reduce Linear gradients in half precision)."""
    cfg: dict[str, Any] = {
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    dtype = PRECISIONS[train.precision]
    if dtype is not None:
        cfg["torch_autocast"] = {"enabled": True, "dtype": str(dtype), "lower_precision_safe_modules": []}
    return cfg


def adamw(groups: list[dict], **kw) -> torch.optim.AdamW:
    """torch's AdamW (not DeepSpeed's JIT-compiled FusedAdam), fused (one kernel over all tensors)
    where this torch and device support it."""
    try:  # torch fills the group dicts it is given: each attempt gets its own copies
        return torch.optim.AdamW([dict(g) for g in groups], fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the kernel
        return torch.optim.AdamW([dict(g) for g in groups], **kw)


def grad_norm(module: nn.Module, scale: float = 1.0) -> Optional[float]:
    """L2 norm over every gradient of ``module`` divided by ``scale`` (None when it has none or it
    is not finite)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    if not norms:
        return None
    norm = float(torch.linalg.vector_norm(torch.stack(norms))) / scale
    return norm if math.isfinite(norm) else None


class Engine:
    """A DeepSpeed engine with the run's optimizer groups and learning rates.

    Args:
        model: the plain ``nn.Module`` to train.
        train: precision, ZeRO stage, batch shape, clipping, AdamW settings.
        dist: this process's place.
        groups: AdamW parameter groups (``{"params", "weight_decay"}``, :func:`launch.runtime.optim.param_groups`).
        schedule: each group's learning rate at every optimizer step, and which groups leave their
            freeze window when (:class:`launch.runtime.optim.LRSchedule`): their Adam moments start
            there (DeepSpeed's ZeRO optimizer would otherwise carry moments through the window).

    ``engine(...)`` runs the model's forward (under the precision's autocast), :meth:`backward` and
    :meth:`step` are DeepSpeed's, per micro-batch; the optimizer acts at the accumulation boundary.
    """

    def __init__(self, model: nn.Module, train: TrainConfig, dist: Dist, groups: list[dict], schedule):
        import deepspeed

        self.train, self.dist = train, dist
        self.schedule = schedule
        if train.compile:  # dynamic: crop sizes, caption lengths and the masked token count vary
            model.compile(backend=train.compile_backend, dynamic=True)  # in place: state dict keys unchanged
        self.config = deepspeed_config(train, dist.world_size)
        optimizer = adamw(groups, lr=0.0, betas=tuple(train.betas), eps=train.eps)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                dist_init_required=False)
        self.optimizer_steps = 0  # optimizer steps taken (skipped fp16 steps included)
        self.fp16_skipped = 0  # of which the loss scaler skipped (overflow)
        self.grad_norm: Optional[float] = None  # the last boundary's, when asked for (want_grad_norm)
        self.want_grad_norm = False
        self._scaler = self._configure_grad_scaler()

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def __call__(self, *args, **kw):
        return self.ds(*args, **kw)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        """DeepSpeed's backward (``scale_wrt_gas=False``: the loss is already that of the whole
        accumulated batch, as feature-cached accumulation makes it)."""
        self.ds.backward(loss, scale_wrt_gas=scale_wrt_gas)

    def step(self) -> None:
        """DeepSpeed's step; at the accumulation boundary first the groups' learning rates of this
        optimizer step, the clipping threshold at the fp16 scale and, without ZeRO, the gradient norm."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        scale = self.loss_scale
        if boundary:
            for group, lr in zip(self.ds.optimizer.param_groups, self.schedule.lrs(self.optimizer_steps)):
                group["lr"] = lr
            for i in self.schedule.unfreezing(self.optimizer_steps):
                self._reset_moments(i)
            if scale is not None and self.train.zero_stage > 0 and self.train.grad_clip > 0:
                self.ds.optimizer.clip_grad = self.train.grad_clip * scale
            self.grad_norm = self._own_grad_norm(scale or 1.0) if self.want_grad_norm else None
        self.ds.step()
        if boundary:
            if self.want_grad_norm and self.train.zero_stage > 0:
                norm = self.ds.get_global_grad_norm()
                self.grad_norm = None if norm is None else float(norm) / (scale or 1.0)
            if scale is not None and self.loss_scale < scale:  # overflow: the scaler skipped the step
                self.fp16_skipped += 1
                self.grad_norm = None
            self.optimizer_steps += 1

    def _own_grad_norm(self, scale: float) -> Optional[float]:
        """Without ZeRO DeepSpeed keeps no gradient norm: taken here before the step clips (the
        gradients averaged over ranks, under fp16 still carrying the loss scale)."""
        return None if self.train.zero_stage > 0 else grad_norm(self.module, scale)

    def _reset_moments(self, group: int) -> None:
        """Forget the optimizer state of one parameter group (its first step after a freeze window).
        Under ZeRO 1/2 the torch optimizer sits under DeepSpeed's wrapper, one flat partition per group."""
        inner = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        for p in inner.param_groups[group]["params"]:
            inner.state.pop(p, None)

    # ---- fp16 loss scaling ------------------------------------------------------------------

    def _find_grad_scaler(self):
        return getattr(self.ds, "torch_autocast_z0_gradscaler", None) or \
            getattr(getattr(self.ds, "optimizer", None), "torch_autocast_gradscaler", None)

    def _configure_grad_scaler(self):
        """Our fp16 GradScaler in DeepSpeed's place: initial scale ``2 ** fp16_initial_scale_power``,
        doubled after ``fp16_loss_scale_window`` steps without overflow, halved (and the step skipped)
        on one. None without fp16."""
        if self.train.precision != "fp16":
            return None
        from deepspeed.accelerator import get_accelerator

        theirs = self._find_grad_scaler()
        if theirs is None:
            raise RuntimeError("DeepSpeed keeps no fp16 GradScaler where this runtime expects it "
                               "(launch.runtime.engine.PRIVATE); this DeepSpeed release is not supported")
        mine = torch.amp.GradScaler(get_accelerator().device_name(), init_scale=2.0 ** self.train.fp16_initial_scale_power,
                                    growth_interval=self.train.fp16_loss_scale_window)
        if getattr(self.ds, "torch_autocast_z0_gradscaler", None) is theirs:
            self.ds.torch_autocast_z0_gradscaler = mine
        else:
            self.ds.optimizer.torch_autocast_gradscaler = mine
        return mine

    @property
    def loss_scale(self) -> Optional[float]:
        """The fp16 loss scale now (None without fp16)."""
        return None if self._scaler is None else float(self._scaler.get_scale())

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What the engine keeps beyond DeepSpeed's checkpoint: step counts and the fp16 scaler."""
        return {"optimizer_steps": self.optimizer_steps, "fp16_skipped": self.fp16_skipped,
                "grad_scaler": self._scaler.state_dict() if self._scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer_steps, self.fp16_skipped = state["optimizer_steps"], state["fp16_skipped"]
        if self._scaler is not None and state.get("grad_scaler"):
            self._scaler.load_state_dict(state["grad_scaler"])

    def save_checkpoint(self, folder: str, tag: str) -> None:
        """DeepSpeed's checkpoint of the model, optimizer and ZeRO partitions (every rank calls this)."""
        self.ds.save_checkpoint(folder, tag=tag, save_latest=False)

    def load_checkpoint(self, folder: str, tag: str) -> bool:
        path, _ = self.ds.load_checkpoint(folder, tag=tag, load_lr_scheduler_states=False)
        return path is not None

    # ---- parameters ----------------------------------------------------------------------------

    def clamp_(self, param: torch.Tensor, low: float, high: float) -> None:
        """Clamp a parameter in place, and the fp32 master copy DeepSpeed keeps of it where it keeps
        one (ZeRO 1/2); every rank calls this after the optimizer step."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        with torch.no_grad():
            master = safe_get_full_fp32_param(param)
            if master is not None:
                safe_set_full_fp32_param(param, master.clamp(low, high))
            param.clamp_(low, high)

    def is_boundary(self) -> bool:
        return self.ds.is_gradient_accumulation_boundary()
