"""An exponential moving average of a model's weights (``train.ema``; timm's ``ModelEmaV3``).

Kept by rank 0 only (every rank holds the same weights under ZeRO 0-2), in fp32 on the model's
device, updated after each optimizer step from ``start_step`` (a copy of the weights before it,
so that the average does not start from the initial weights), saved in rank 0's resume state so
that a resumed run's average is the uninterrupted run's to the bit. :meth:`EMA.swapped` puts the
averaged weights into the model for an evaluation or an export, and the trained ones back.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from launch.runtime.config import EMAConfig


class EMA:
    """The average of ``model``'s floating-point state (parameters and buffers) under ``cfg``."""

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.model, self.cfg = model, cfg
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        if step % self.cfg.every:
            return
        decay = self.cfg.decay if step > self.cfg.start_step else 0.0
        live = self.model.state_dict()
        # one fused update over every tensor (timm's ModelEmaV3 does the same), not a kernel per tensor
        torch._foreach_lerp_(list(self.shadow.values()), [live[k].detach().float() for k in self.shadow], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged weights (for an export)."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v for k, v in self.model.state_dict().items()}

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged weights in the model for the block, its own after."""
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.shadow}
        self.model.load_state_dict(self.weights(), strict=True)
        try:
            yield
        finally:
            self.model.load_state_dict({**self.model.state_dict(), **own}, strict=True)
