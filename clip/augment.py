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

Three implementations of the same views (``impl``; the same crop-box and flip distribution, one
sampler: torchvision's ``RandomResizedCrop.get_params``):
  * ``"torchvision"``: the reference. Full decode, then v2 RandomResizedCrop (bicubic, antialias)
    + flip + normalise per crop, on the worker. Output: float (3, S, S) crops.
  * ``"fast"`` (default): boxes drawn first, from the image header; JPEGs decoded straight to
    an array by libjpeg-turbo (``mae.jpeg``: Pillow's pixels without Pillow's image object) at the
    largest DCT reduction (1/2, 1/4, 1/8) that keeps every box at least its output size; each crop
    resized straight from its box with the reference's kernel (torch's uint8 bicubic antialias,
    fed channels-last, where it runs ~2x faster); uint8 all the way. Output per sample: the V
    uint8 crops and their flips, flipped and normalised batched on the accelerator by
    :func:`finish_images`.
  * ``"device"``: workers decode (reduced as above) and draw boxes; crop, resize (``roi_align``
    with adaptive sampling, an area-averaging resample), flip and normalisation run batched on the
    accelerator in :func:`finish_images`, two kernels per crop size for the whole batch.
``finish_images`` is the step's one entry: float crops pass, fast batches are flipped and
normalised, device batches are cropped. ``bench/loader.py`` measures the three;
``tests/test_fast_augment.py`` and ``tests/test_jpeg.py`` check that they draw the same
distribution and how far their pixels are from the reference (the fast path's: not at all
without reduced decoding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torchvision.transforms import InterpolationMode, v2

from mae.data import CLIP_MEAN, CLIP_STD
from mae.views import DeviceCrops, FastCrops, finish_views

AugmentImpl = Literal["fast", "torchvision", "device"]



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
    impl: AugmentImpl = "fast"  # see the module docstring; all three draw the same crops

    def specs(self) -> list[tuple[int, tuple[float, float]]]:
        """(output size, area range) of each of the V = G + K crops, globals first."""
        return ([(self.global_size, tuple(self.global_scale))] * self.global_crops
                + [(self.local_size, tuple(self.local_scale))] * self.local_crops)


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


def build_multicrop(cfg: MultiCropConfig):
    """The worker-side view maker of ``cfg.impl`` (see the module docstring)."""
    if cfg.impl not in get_args(AugmentImpl):
        raise ValueError(f"augment.impl must be one of {get_args(AugmentImpl)}, got {cfg.impl!r}")
    return {"torchvision": MultiCrop, "fast": FastMultiCrop, "device": DeviceMultiCrop}[cfg.impl](cfg)


class MultiCrop:
    """The reference views (``impl="torchvision"``).

    ``MultiCrop(cfg)(img) -> [G global (3, Sg, Sg)] + [K local (3, Sl, Sl)]`` float tensors.

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


# ----------------------------------------------------------------------------- fast and device paths
class FastMultiCrop(FastCrops):
    """``impl="fast"``: ``FastMultiCrop(cfg)(src) -> {"views": V uint8 (3, S, S), "flips": (V,)}``
    (:class:`mae.views.FastCrops` over ``cfg.specs()``, with the ``strong`` photometric
    augmentation on the uint8 crops). Flip and normalise with :func:`finish_images`."""

    def __init__(self, cfg: MultiCropConfig = MultiCropConfig()):
        MultiCrop(cfg)  # the same argument checks
        super().__init__(cfg.specs(), {s: _photometric(s) for s, _ in cfg.specs()} if cfg.strong else None)
        self.cfg = cfg


class DeviceMultiCrop(DeviceCrops):
    """``impl="device"``, the worker's half (:class:`mae.views.DeviceCrops` over ``cfg.specs()``);
    :func:`finish_images` crops on the accelerator."""

    def __init__(self, cfg: MultiCropConfig = MultiCropConfig()):
        MultiCrop(cfg)
        if cfg.strong:
            raise ValueError("augment.strong is not available with augment.impl=device; use fast or torchvision")
        super().__init__(cfg.specs())
        self.cfg = cfg


def _photometric(size: int):
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
    ])


def finish_images(images, cfg: MultiCropConfig, chunk: int = 64) -> list[torch.Tensor]:
    """The training step's V float crop batches from what the collate made, on the device
    (:func:`mae.views.finish_views` with ``cfg``'s crops and normalisation)."""
    return finish_views(images, cfg.specs(), cfg.mean, cfg.std, chunk)
