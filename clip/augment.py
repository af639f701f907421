"""Image views for the CLIP stage: KELIP's multi-crop (the evaluation view is ``mae.data.eval_transform``).

Multi-crop (Caron et al. 2020, used by KELIP): each training image becomes G global crops at
224 px and K local crops at 96 px (RandomResizedCrop over ``global_scale`` / ``local_scale`` of
the area, plus a horizontal flip). The ViT reads 96 px crops with bicubic-resized position
embeddings (a 3x3 grid for /32), so local crops cost about a fifth of a global crop.

Loss choice for multi-crop: EVERY crop's embedding is contrasted with the batch's texts
(``clip.loss.ClipLoss`` over image features (V, B, E), V = G + K) and the V crop losses are
averaged with equal weight; crops are never contrasted with each other. G/K = 1/0 is plain CLIP
(one 224 px crop).

``strong=True`` adds SimCLR's photometric augmentation (colour jitter 0.4/0.4/0.4/0.1 with
p=0.8, grayscale p=0.2, Gaussian blur with sigma in [0.1, 2] and a kernel of ~10% of the crop
with p=0.5). It is off by default: KELIP found it helps zero-shot classification but hurts
retrieval.

All transforms are torchvision.transforms.v2 on PIL RGB (or tensor) images; the output is float
(3, S, S), normalised with CLIP's mean / std by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from mae.data import CLIP_MEAN, CLIP_STD



@dataclass(frozen=True)
class MultiCropConfig:
    """Number, size and area range of the global and local crops; ``strong`` photometric aug."""

    global_crops: int = 2
    local_crops: int = 4
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    strong: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def crop_transform(size: int, scale: tuple[float, float], strong: bool,
                   mean=CLIP_MEAN, std=CLIP_STD) -> v2.Compose:
    """One random view: RandomResizedCrop + HFlip [+ SimCLR colour / blur] + Normalize."""
    ops = [
        v2.ToImage(),  # uint8 tensor: the geometric and colour ops run on tensors, not PIL
        v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if strong:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, about 10% of the crop (SimCLR)
        ops += [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class MultiCrop:
    """``MultiCrop(cfg)(img) -> [G global (3, Sg, Sg)] + [K local (3, Sl, Sl)]`` tensors.

    Args:
        cfg: crop counts, sizes, area ranges, ``strong`` switch and normalisation.
    """

    def __init__(self, cfg: MultiCropConfig = MultiCropConfig()):
        if cfg.global_crops < 1 or cfg.local_crops < 0:
            raise ValueError(f"MultiCropConfig: need global_crops >= 1 and local_crops >= 0, got "
                             f"{cfg.global_crops} and {cfg.local_crops}")
        self.cfg = cfg
        self.global_transform = crop_transform(cfg.global_size, cfg.global_scale, cfg.strong,
                                               cfg.mean, cfg.std)
        self.local_transform = crop_transform(cfg.local_size, cfg.local_scale, cfg.strong,
                                              cfg.mean, cfg.std)

    def __call__(self, img) -> list[torch.Tensor]:
        return ([self.global_transform(img) for _ in range(self.cfg.global_crops)]
                + [self.local_transform(img) for _ in range(self.cfg.local_crops)])
