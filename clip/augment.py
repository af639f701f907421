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
  * ``"fast"`` (default): boxes drawn first, from the image header; JPEGs decoded at the largest
    DCT reduction (1/2, 1/4, 1/8: PIL ``draft``) that keeps every box at least its output size;
    each crop resized straight from its box (PIL bicubic with antialias, i.e. one resample of
    the box only); flip on the small crop; uint8 all the way. Output: uint8 (3, S, S) crops,
    normalised batched on the accelerator by :func:`finish_images`.
  * ``"device"``: workers decode (reduced as above) and draw boxes; crop, resize (``roi_align``
    with adaptive sampling, an area-averaging resample), flip and normalisation run batched on the
    accelerator in :func:`finish_images`, two kernels per crop size for the whole batch.
``finish_images`` is the step's one entry: float crops pass, uint8 crops are normalised, device
batches are cropped. ``bench/loader.py`` measures the three; ``tests/test_augment.py`` checks that
they draw the same distribution and how far their pixels are from the reference.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from mae.data import CLIP_MEAN, CLIP_STD, to_rgb

AugmentImpl = Literal["fast", "torchvision", "device"]
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (its default)



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
def draw_crops(cfg: MultiCropConfig, width: int, height: int) -> list[tuple[tuple[int, int, int, int], int, bool]]:
    """Draw the V crops of a ``width`` x ``height`` image: ``[(box (left, top, right, bottom), output
    size, flip)]``, by torchvision's RandomResizedCrop algorithm (:func:`sample_box`) and a fair
    flip. The draws come from a Python generator seeded from torch's random state, one torch call
    per image instead of ~10 per crop, so a sample's seed still fixes its crops."""
    rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
    return [(sample_box(rng, width, height, scale), size, rng.random() < 0.5) for size, scale in cfg.specs()]


def sample_box(rng: random.Random, width: int, height: int, scale, ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (area fraction uniform in ``scale``, log aspect
    uniform in log ``ratio``, 10 tries, then the centre crop clipped to ``ratio``), drawing from
    ``rng``. Returns (left, top, right, bottom)."""
    area = width * height
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def reduction_for(crops) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) after which every crop box is still at least
    its output size in both directions, so no crop is upsampled that the reference downsamples."""
    need = min(min(r - l, b - t) / size for (l, t, r, b), size, _ in crops)
    return next(s for s in (8, 4, 2, 1) if s <= need) if need >= 1 else 1


def open_for_crops(src, cfg: MultiCropConfig):
    """Decode ``src`` (path, bytes or a PIL image) just as large as ``cfg``'s crops need.

    Returns ``(rgb, crops)``: the RGB image (EXIF orientation applied, transparency flattened
    onto white, as :func:`mae.data.load_rgb`), possibly DCT-reduced, and the crops drawn on the
    full-size image with their boxes scaled to ``rgb`` (floats)."""
    if isinstance(src, Image.Image):
        rgb = to_rgb(src)
        return rgb, draw_crops(cfg, *rgb.size)
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with Image.open(fp) as img:
        W, H = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees once upright
            W, H = H, W
        crops = draw_crops(cfg, W, H)
        s = reduction_for(crops)
        if s > 1 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(img.size[0] / s), math.ceil(img.size[1] / s)))
        img.load()  # truncated data raises here
        rgb = to_rgb(img)
    sx, sy = W / rgb.width, H / rgb.height
    return rgb, [((l / sx, t / sy, r / sx, b / sy), size, flip) for (l, t, r, b), size, flip in crops]


def _photometric(size: int):
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
    ])


class FastMultiCrop:
    """``impl="fast"``: ``FastMultiCrop(cfg)(src) -> V uint8 (3, S, S)`` crops from a path, encoded
    bytes or a PIL image (reduced decoding needs the first two). Normalise with :func:`finish_images`."""

    takes_encoded = True  # the pair stream hands over the path or bytes, not a decoded image

    def __init__(self, cfg: MultiCropConfig = MultiCropConfig()):
        MultiCrop(cfg)  # the same argument checks
        self.cfg = cfg
        self.photometric = {s: _photometric(s) for s, _ in cfg.specs()} if cfg.strong else None

    def __call__(self, src) -> list[torch.Tensor]:
        rgb, crops = open_for_crops(src, self.cfg)
        x = pil_to_uint8(rgb)  # (3, h, w): one copy; the crops are views of it until resized
        out = []
        for box, size, flip in crops:
            l, t, r, b = _int_box(box, x.shape[-1], x.shape[-2])
            crop = F.resized_crop(x, t, l, b - t, r - l, [size, size], interpolation=InterpolationMode.BICUBIC,
                                  antialias=True)  # torchvision's uint8 kernel, that of the reference
            if flip:
                crop = crop.flip(-1)
            out.append(self.photometric[size](crop) if self.photometric else crop)
        return out


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor (channels-first view of one copy)."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _int_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A float box (from a reduced decode) rounded to whole pixels inside the image, at least 1 px."""
    l, t = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    return l, t, max(l + 1, min(round(box[2]), width)), max(t + 1, min(round(box[3]), height))


class DeviceMultiCrop:
    """``impl="device"``, the worker's half: ``(src) -> {"pixels": uint8 (3, h, w), "boxes": (V, 4)
    float, "flips": (V,) bool}``; :func:`collate_pending` batches these and :func:`finish_images`
    crops them on the accelerator."""

    takes_encoded = True

    def __init__(self, cfg: MultiCropConfig = MultiCropConfig()):
        MultiCrop(cfg)
        if cfg.strong:
            raise ValueError("augment.strong is not available with augment.impl=device; use fast or torchvision")
        self.cfg = cfg

    def __call__(self, src) -> dict:
        rgb, crops = open_for_crops(src, self.cfg)
        return {"pixels": pil_to_uint8(rgb),
                "boxes": torch.tensor([box for box, _, _ in crops], dtype=torch.float32),
                "flips": torch.tensor([flip for _, _, flip in crops], dtype=torch.bool)}


def collate_pending(items: list[dict]) -> dict:
    """Batch :class:`DeviceMultiCrop` outputs: pixels zero-padded to the largest image, (B, 3, H, W)
    uint8, with ``boxes`` (B, V, 4) and ``flips`` (B, V)."""
    H = max(it["pixels"].shape[1] for it in items)
    W = max(it["pixels"].shape[2] for it in items)
    pixels = torch.zeros(len(items), 3, H, W, dtype=torch.uint8)
    for i, it in enumerate(items):
        p = it["pixels"]
        h, w = p.shape[1:]
        pixels[i, :, :h, :w] = p
        pixels[i, :, h:, :w] = p[:, -1:, :]  # edge-replicated padding: the resample at a box's
        pixels[i, :, :, w:] = pixels[i, :, :, w - 1:w]  # edge reads the image's edge, not zeros
    return {"pixels": pixels, "boxes": torch.stack([it["boxes"] for it in items]),
            "flips": torch.stack([it["flips"] for it in items])}


def normalize_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised with ``mean`` / ``std`` (of [0, 1] pixels)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    return (x.float() - m) / s


def finish_images(images, cfg: MultiCropConfig, chunk: int = 64) -> list[torch.Tensor]:
    """The training step's view of a batch's images, on whatever device they are: V float
    (B, 3, S, S) crop batches. Float crops pass unchanged, uint8 crops are normalised, a device
    batch (``collate_pending``) is cropped, resized, flipped and normalised here, ``chunk``
    images at a time (bounds the float copy of the pixels)."""
    if isinstance(images, dict):
        return _device_crops(images, cfg, chunk)
    return [normalize_uint8(x, cfg.mean, cfg.std) if x.dtype == torch.uint8 else x for x in images]


def _device_crops(batch: dict, cfg: MultiCropConfig, chunk: int) -> list[torch.Tensor]:
    from torchvision.ops import roi_align

    pixels, boxes, flips = batch["pixels"], batch["boxes"], batch["flips"]  # (B,3,H,W) (B,V,4) (B,V)
    B, V = boxes.shape[:2]
    sizes = [size for size, _ in cfg.specs()]
    if len(sizes) != V:
        raise ValueError(f"device batch has {V} crops per image, augment config {len(sizes)}")
    out: list[list[torch.Tensor]] = [[] for _ in range(V)]
    for lo in range(0, B, chunk):
        px = pixels[lo:lo + chunk].float()  # (b, 3, H, W) in [0, 255]
        b = px.shape[0]
        idx = torch.arange(b, device=px.device, dtype=torch.float32)
        for size in dict.fromkeys(sizes):  # one roi_align per crop size
            vs = [v for v in range(V) if sizes[v] == size]
            rois = torch.cat([torch.cat([idx[:, None], boxes[lo:lo + b, v]], dim=1) for v in vs])  # (len(vs) b, 5)
            crops = roi_align(px, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            for k, v in enumerate(vs):
                c = crops[k * b:(k + 1) * b]
                out[v].append(torch.where(flips[lo:lo + b, v].view(-1, 1, 1, 1), c.flip(-1), c))
    m = torch.tensor(cfg.mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(cfg.std, device=pixels.device).view(1, 3, 1, 1) * 255.0
    return [(torch.cat(o).clamp_(0, 255) - m) / s for o in out]
