"""Optimisation: precision, the DeepSpeed config, AdamW groups, the lr schedule and tower freezing.

Each rule has one owner here: :data:`PRECISIONS` (precision -> weights, autocast),
:func:`no_weight_decay` (which parameters are not decayed), :class:`LRSchedule` (peak lr,
warmup, cosine) and :class:`FreezeSchedule` (which parameters are frozen for how many steps: their
learning rate is 0 and they get no gradient). :func:`build_engine` puts them together in
``deepspeed.initialize``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Optional, get_args

import torch
from torch import nn

from launch.config import ConfigError, Precision, TrainConfig
from launch.dist import Dist


@dataclass(frozen=True)
class PrecisionSpec:
    weights: torch.dtype  # what the model's parameters are kept in
    autocast: Optional[torch.dtype]  # the forward runs under torch.autocast to this dtype (DeepSpeed's torch_autocast)


# bf16 and fp16 are autocast over fp32 weights (as open_clip's amp_bf16 / amp): every parameter
# (LayerNorm, embeddings, logit_scale) stays fp32, so the optimizer needs no master copy; matmuls run
# in half precision, softmax / LayerNorm / the loss in fp32 where autocast's policy says so. Both go
# through DeepSpeed's ``torch_autocast`` section (DeepSpeed >= 0.18): its engine forward applies the
# autocast (and, since 0.17.2, switches off any autocast it was not configured with: without the
# section a bf16 forward under the engine would run in fp32 on GPUs), and for fp16 it scales the
# loss with a GradScaler at every ZeRO stage. ``lower_precision_safe_modules: []`` keeps gradient
# communication in fp32 (DeepSpeed's default would all-reduce Linear/Conv gradients in half precision).
PRECISIONS: dict[str, PrecisionSpec] = {
    "fp32": PrecisionSpec(torch.float32, None),
    "bf16": PrecisionSpec(torch.float32, torch.bfloat16),
    "fp16": PrecisionSpec(torch.float32, torch.float16),
}
assert set(PRECISIONS) == set(get_args(Precision))


def autocast(train: TrainConfig, device: torch.device):
    """The context the forward runs in: ``torch.autocast`` for bf16 and fp16, nothing for fp32."""
    dtype = PRECISIONS[train.precision].autocast
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def global_batch(train: TrainConfig, world_size: int) -> int:
    return train.micro_batch_size * train.grad_accum * world_size


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for a run (saved as ``ds_config.json`` in the run folder)."""
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch(train, world_size),
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    spec = PRECISIONS[train.precision]
    if spec.autocast is not None:
        cfg["torch_autocast"] = {"enabled": True, "dtype": str(spec.autocast), "lower_precision_safe_modules": []}
    return cfg


def grad_scaler(engine) -> Optional["torch.amp.GradScaler"]:
    """The fp16 loss scaler DeepSpeed keeps for ``torch_autocast`` (the engine's without ZeRO, the
    ZeRO optimizer's with it), or None."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None) or \
        getattr(getattr(engine, "optimizer", None), "torch_autocast_gradscaler", None)


def clip_at_loss_scale(engine, train: TrainConfig, scale: float) -> None:
    """Under fp16 the ZeRO 1/2 optimizer clips the gradients while they still carry the GradScaler's
    scale (its own loss scale stays 1), so its threshold must carry it too: ``train.grad_clip x
    scale``, set before each step. (DeepSpeed 0.19 clips at ``train.grad_clip`` of the scaled norm,
    i.e. ~``scale`` times too hard.) Without ZeRO the engine unscales before it clips."""
    if train.zero_stage > 0 and train.grad_clip > 0 and hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = train.grad_clip * scale


def configure_grad_scaler(engine, train: TrainConfig) -> None:
    """Give DeepSpeed's fp16 GradScaler our settings: initial scale ``2 ** fp16_initial_scale_power``,
    doubled after ``fp16_loss_scale_window`` steps without overflow, halved (and the step skipped)
    on one. DeepSpeed builds it with torch's defaults and no config keys for them."""
    from deepspeed.accelerator import get_accelerator

    scaler = grad_scaler(engine)
    if scaler is None:
        return
    mine = torch.amp.GradScaler(get_accelerator().device_name(), init_scale=2.0 ** train.fp16_initial_scale_power,
                                growth_interval=train.fp16_loss_scale_window)
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is scaler:
        engine.torch_autocast_z0_gradscaler = mine
    else:
        engine.optimizer.torch_autocast_gradscaler = mine


class LRSchedule:
    """Peak lr (``train.lr``, else ``base_lr * global_batch / 256``), per-step linear warmup, then a
    half-cycle cosine from the peak down to ``train.min_lr`` at ``train.steps``."""

    def __init__(self, train: TrainConfig, world_size: int):
        self.train = train
        self.peak = train.lr if train.lr is not None else train.base_lr * global_batch(train, world_size) / 256
        self.floor = train.min_lr / self.peak if self.peak > 0 else 0.0

    def factor(self, step: int) -> float:
        """Factor of the peak lr at optimizer step ``step`` (0-based)."""
        return lr_factor(step, self.train, self.floor)

    def lr(self, step: int) -> float:
        """The lr of the parameters that are not frozen, at optimizer step ``step``."""
        return self.peak * self.factor(step)


def lr_factor(step: int, train: TrainConfig, floor: float = 0.0) -> float:
    """Linear warmup over ``train.warmup_steps``, then cosine from 1 to ``floor`` at ``train.steps``."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def freeze_steps(steps: int, epochs: float, steps_per_epoch: Optional[float], key: str) -> int:
    """A freeze window in optimizer steps: the larger of ``steps`` and ``ceil(epochs * steps_per_epoch)``.
    ``key`` names the setting (e.g. ``freeze.image``) in the error for a source of unknown size."""
    if epochs > 0 and steps_per_epoch is None:
        raise ConfigError(f"{key}_epochs needs a data source of known size; use {key}_steps")
    return max(steps, math.ceil(epochs * steps_per_epoch) if epochs > 0 else 0)


class FreezeSchedule:
    """Parameters frozen at the start of training: for the first ``n`` optimizer steps of a window,
    the parameters whose names start with its prefix have learning rate 0 (so they stay
    bit-identical) and ``requires_grad=False`` (so no gradient is computed or kept for them).

    Args:
        model: the model whose parameters are frozen (those that require grad now).
        windows: parameter-name prefix -> steps, e.g. ``{"visual.": 42, "text.": 0}``; a parameter
            under several prefixes takes the longest window.
    """

    def __init__(self, model: nn.Module, windows: Optional[dict[str, int]] = None):
        self.windows = {p: int(n) for p, n in (windows or {}).items() if n > 0}
        self._steps = {id(p): self.steps_for(name) for name, p in model.named_parameters() if p.requires_grad}
        self._managed = [p for p in model.parameters() if self._steps.get(id(p), 0) > 0]

    def steps_for(self, name: str) -> int:
        """The freeze window (steps) of the parameter called ``name``."""
        return max([n for pre, n in self.windows.items() if name.startswith(pre)], default=0)

    def steps_of(self, param: torch.Tensor) -> int:
        return self._steps.get(id(param), 0)

    def lr_lambda(self, schedule: LRSchedule, window: int):
        """The factor of the peak lr for a parameter group frozen for ``window`` steps."""
        return lambda step: 0.0 if step < window else schedule.factor(step)

    def apply(self, step: int) -> None:
        """Set ``requires_grad`` of every managed parameter for optimizer step ``step``."""
        for p in self._managed:
            p.requires_grad_(step >= self._steps[id(p)])


_NO_DECAY_NAMES = {"pos_embed", "cls_token", "reg_token", "mask_token", "logit_scale"}


def no_weight_decay(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """True for biases and norm weights (every tensor of < 2 dims), embeddings (token tables,
    position, cls and mask tokens) and ``logit_scale``: decay would pull them toward 0 for no gain."""
    return (param.ndim < 2 or isinstance(module, (nn.Embedding, nn.LayerNorm))
            or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float, freeze: Optional[FreezeSchedule] = None) -> list[dict]:
    """AdamW groups of the parameters that require grad, split by decay (:func:`no_weight_decay`)
    and by freeze window. Returns ``[{"params", "weight_decay"}, ...]`` (plain torch groups)."""
    groups: dict[tuple[int, bool], list] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            window = freeze.steps_of(p) if freeze else 0
            groups.setdefault((window, no_weight_decay(name, p, module)), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if nd else weight_decay}
            for (_, nd), ps in sorted(groups.items(), key=lambda kv: kv[0])]


def adamw(groups: list[dict], **kw) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over all tensors) where this torch and device support it."""
    try:  # torch fills the group dicts it is given: each attempt gets its own copies
        return torch.optim.AdamW([dict(g) for g in groups], fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the kernel
        return torch.optim.AdamW([dict(g) for g in groups], **kw)


def maybe_compile(model: nn.Module, train: TrainConfig) -> None:
    """``model.compile()`` in place when ``train.compile`` is set (``dynamic``: crop sizes, caption
    lengths and the masked token count vary); the state dict keeps its keys."""
    if train.compile:
        model.compile(backend=train.compile_backend, dynamic=True)


def clamp_parameter_(param: torch.Tensor, low: float, high: float) -> None:
    """Clamp a parameter in place, and the fp32 master copy DeepSpeed keeps of it where it keeps
    one (ZeRO 1/2); every rank calls this after the optimizer step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    with torch.no_grad():
        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(low, high))
        param.clamp_(low, high)


def build_engine(model: nn.Module, train: TrainConfig, dist: Dist, freeze: Optional[FreezeSchedule] = None):
    """``deepspeed.initialize`` with torch's AdamW (not DeepSpeed's JIT-compiled FusedAdam), the
    groups of :func:`param_groups` and the lr schedule with each group's freeze window.

    Returns ``(engine, ds_config, schedule)``.
    """
    import deepspeed

    freeze = freeze or FreezeSchedule(model)
    groups = param_groups(model, train.weight_decay, freeze)
    schedule = LRSchedule(train, dist.world_size)
    windows = [freeze.steps_of(g["params"][0]) for g in groups]
    optimizer = adamw(groups, lr=schedule.peak, betas=tuple(train.betas), eps=train.eps)

    def make_scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, [freeze.lr_lambda(schedule, w) for w in windows])

    ds_cfg = deepspeed_config(train, dist.world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_cfg, dist_init_required=False
    )
    configure_grad_scaler(engine, train)
    return engine, ds_cfg, schedule
