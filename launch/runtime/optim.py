"""What the optimizer sees: parameter groups, the learning-rate schedule, tower freezing.

Each rule has one owner here: :func:`no_weight_decay` (which parameters are not decayed),
:class:`FreezeSchedule` (which parameters are frozen for how many steps: no gradient, learning
rate 0), :class:`LRSchedule` (peak lr, warmup, cosine; each group's rate from its freeze window)
and :func:`param_groups` (the AdamW groups those rules imply). The engine
(:class:`launch.runtime.engine.Engine`) applies the rates at every optimizer step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from launch.runtime.config import ConfigError, TrainConfig


def global_batch(train: TrainConfig, world_size: int) -> int:
    return train.micro_batch_size * train.grad_accum * world_size


def lr_factor(step: int, train: TrainConfig, floor: float = 0.0) -> float:
    """Linear warmup over ``train.warmup_steps``, then cosine from 1 to ``floor`` at ``train.steps``."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Peak lr (``train.lr``, else ``base_lr * global_batch / 256``, MAE's rule), per-step linear
    warmup, then a half-cosine down to ``train.min_lr`` at ``train.steps``. A group frozen for its
    first ``window`` steps has rate 0 until then and, with ``rewarm`` steps, re-warms linearly from
    there (its rate times ``(j + 1) / rewarm`` at the ``j``-th step after its window); a group's
    ``scale`` (layer-wise decay) multiplies its rate.

    Args:
        train: the run's optimisation settings.
        world_size: ranks (for the global batch).
        groups: each optimizer group's ``(freeze window in steps, lr scale)`` (:func:`param_groups`).
        rewarm: steps over which a group leaving its freeze window re-warms (0: at once).
    """

    def __init__(self, train: TrainConfig, world_size: int, groups: Optional[list[tuple[int, float]]] = None,
                 rewarm: int = 0):
        self.train, self.groups, self.rewarm = train, list(groups or [(0, 1.0)]), rewarm
        self.peak = train.lr if train.lr is not None else train.base_lr * global_batch(train, world_size) / 256
        self.floor = train.min_lr / self.peak if self.peak > 0 else 0.0

    def factor(self, step: int, window: int = 0) -> float:
        """Factor of the peak lr at optimizer step ``step`` (0-based) for a group frozen ``window`` steps."""
        if step < window:
            return 0.0
        ramp = min(1.0, (step - window + 1) / self.rewarm) if window > 0 and self.rewarm > 0 else 1.0
        return ramp * lr_factor(step, self.train, self.floor)

    def lr(self, step: int) -> float:
        """The lr of the parameters that are not frozen, at optimizer step ``step``."""
        return self.peak * self.factor(step)

    def lrs(self, step: int) -> list[float]:
        """Every optimizer group's lr at optimizer step ``step``."""
        return [self.peak * scale * self.factor(step, window) for window, scale in self.groups]

    def unfreezing(self, step: int) -> list[int]:
        """The groups whose freeze window ends at optimizer step ``step`` (their first step)."""
        return [i for i, (window, _) in enumerate(self.groups) if window > 0 and step == window]


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
        unlocked: prefix -> N: the last N blocks of that tower and what follows them (its final
            norm) train during the window (open_clip's ``--lock-*-unlocked-*``), by the model's
            ``layer_index(name)`` (:meth:`clip.model.clip.CLIP.layer_index`).
    """

    def __init__(self, model: nn.Module, windows: Optional[dict[str, int]] = None,
                 unlocked: Optional[dict[str, int]] = None):
        self.windows = {p: int(n) for p, n in (windows or {}).items() if n > 0}
        self.unlocked = {p: int(n) for p, n in (unlocked or {}).items() if n > 0}
        self._layer = getattr(model, "layer_index", lambda name: None)
        self._steps = {id(p): self.steps_for(name) for name, p in model.named_parameters() if p.requires_grad}
        self._managed = [p for p in model.parameters() if self._steps.get(id(p), 0) > 0]

    def steps_for(self, name: str) -> int:
        """The freeze window (steps) of the parameter called ``name``."""
        index = self._layer(name) if self.unlocked else None
        for pre, n in self.unlocked.items():
            if index is not None and name.startswith(pre) and index[1] > index[2] - 1 - n:
                return 0  # among the last n blocks or after them
        return max([n for pre, n in self.windows.items() if name.startswith(pre)], default=0)

    def steps_of(self, param: torch.Tensor) -> int:
        return self._steps.get(id(param), 0)

    def settle_step(self) -> int:
        """The step after which nothing is frozen any more."""
        return max(self.windows.values(), default=0)

    def apply(self, step: int) -> None:
        """Set ``requires_grad`` of every managed parameter for optimizer step ``step``."""
        for p in self._managed:
            p.requires_grad_(step >= self._steps[id(p)])


_NO_DECAY_NAMES = {"pos_embed", "cls_token", "reg_token", "mask_token", "logit_scale", "logit_bias"}


def no_weight_decay(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """True for biases and norm weights (every tensor of < 2 dims), embeddings (token tables,
    position, cls and mask tokens) and the logit scale and bias: decay would pull them toward 0 for no gain."""
    return (param.ndim < 2 or isinstance(module, (nn.Embedding, nn.LayerNorm))
            or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES)


def layer_decay(model: nn.Module, decay: float):
    """``name -> lr scale`` of layer-wise decay (MAE's fine-tuning recipe, BEiT, EVA): a parameter
    of layer ``i`` of a tower of ``L`` layers (``model.layer_index``) gets ``decay ** (L - i)``, so
    the embeddings move least and what follows the last block at the full rate; parameters outside
    the towers get 1."""
    index = getattr(model, "layer_index", lambda name: None)

    def scale(name: str) -> float:
        found = index(name) if decay != 1.0 else None
        return 1.0 if found is None else decay ** (found[2] - found[1])

    return scale


def param_groups(model: nn.Module, weight_decay: float, freeze: Optional[FreezeSchedule] = None,
                 lr_scale=None) -> tuple[list[dict], list[tuple[int, float]]]:
    """AdamW groups of the parameters that require grad, split by decay (:func:`no_weight_decay`),
    freeze window and lr scale (``lr_scale(name)``, e.g. :func:`layer_decay`): ``([{"params",
    "weight_decay"}, ...], [(window, scale) of each group])`` (plain torch groups; the windows and
    scales feed :class:`LRSchedule`)."""
    groups: dict[tuple[int, float, bool], list] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            window = freeze.steps_of(p) if freeze else 0
            scale = lr_scale(name) if lr_scale is not None else 1.0
            groups.setdefault((window, -scale, no_weight_decay(name, p, module)), []).append(p)
    keys = sorted(groups)
    return ([{"params": groups[k], "weight_decay": 0.0 if k[2] else weight_decay} for k in keys],
            [(k[0], -k[1]) for k in keys])
