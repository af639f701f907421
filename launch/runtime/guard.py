"""The divergence guard: stops a run whose loss explodes or collapses (settings: ``GuardConfig``)."""
from __future__ import annotations

import math
import statistics
from typing import Optional

from launch.runtime.config import GuardConfig


class Diverged(RuntimeError):
    """Training went wrong in a way more steps will not fix (non-finite or exploding loss, collapse)."""


class Guard:
    """Checks each logged row (values already averaged over ranks, so every rank decides alike).

    Args:
        cfg: the thresholds.
        chance: the loss of uniform logits (CLIP), or None where there is none (MAE).
        settle_step: collapse checks start after this step (warmup and freeze windows).
    """

    def __init__(self, cfg: GuardConfig, chance: Optional[float] = None, settle_step: int = 0):
        self.cfg, self.chance, self.settle_step = cfg, chance, settle_step
        self.losses: list[float] = []
        self.at_chance = 0

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "at_chance": self.at_chance}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.at_chance = list(state["losses"]), state["at_chance"]

    def check(self, step: int, logs: dict[str, float]) -> None:
        """Raise :class:`Diverged` with one line saying why, or record the row."""
        loss, cfg = logs["train/loss"], self.cfg
        recent = self.losses[-cfg.window:] if cfg.window else self.losses
        if cfg.loss_spike and recent and loss > cfg.loss_spike * statistics.median(recent):
            raise Diverged(f"loss {loss:.4g} at step {step} is over {cfg.loss_spike:g}x its recent median "
                           f"{statistics.median(recent):.4g} (guard.loss_spike): diverged; lower the lr")
        temperature = logs.get("train/temperature")
        if cfg.max_temperature and temperature is not None and not temperature <= cfg.max_temperature:
            raise Diverged(f"temperature {temperature:.4g} at step {step} is above guard.max_temperature="
                           f"{cfg.max_temperature:g}: the contrastive logits have collapsed")
        if self.chance is not None and cfg.chance_logs and step > self.settle_step:
            self.at_chance = self.at_chance + 1 if math.isclose(loss, self.chance, rel_tol=2e-3) else 0
            if self.at_chance >= cfg.chance_logs:
                raise Diverged(f"the loss has stayed at the chance level {self.chance:.4f} for {self.at_chance} "
                               f"logs (guard.chance_logs), up to step {step}: the model has collapsed")
        self.losses.append(loss)
        del self.losses[:-max(cfg.window, 1)]
