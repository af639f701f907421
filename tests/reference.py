"""What the view tests compare the crop engine with (not library code: nothing in training uses it)."""
from __future__ import annotations

import torch

from mae.images.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from mae.images.views import FastViews


def fast_views(specs, strong: bool = False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> FastViews:
    return FastViews(specs, mean, std, strong)


def apply_flips(item: dict) -> list[torch.Tensor]:
    """The final crops of one fast-path sample, flipped where drawn (on the host)."""
    return [v.flip(-1) if f else v for v, f in zip(item["views"], item["flips"].tolist())]
