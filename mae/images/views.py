# Over 300 lines: the box sampler, the decode-for-crops routes and the three view makers that share them.
"""Random-resized-crop views of both stages, decoded only as large as they need (the crop engine).

A view spec is ``(output size, (min area, max area))``; MAE draws one view per image, CLIP's
multi-crop V (``clip.data.multicrop``). :func:`make_views` builds the one view maker of a run
(its ``impl`` decided there, once), whose three halves run where they belong:

* ``views(src)`` in a DataLoader worker: the encoded image (path or bytes) -> one sample's views;
* ``views.collate(items)`` in the worker: a batch;
* ``views.finish(batch)`` in the training step, on the accelerator: V float ``(B, 3, S, S)`` crop
  batches, normalised.

Three implementations draw the same crops (torchvision's RandomResizedCrop sampler, then a fair
flip; tested by Kolmogorov-Smirnov):

* ``torchvision`` (the reference): full decode, then per crop :func:`mae.images.transforms.random_crop`.
* ``fast``: boxes drawn first from the image header; JPEGs decoded by libjpeg-turbo straight to an
  array (:mod:`mae.images.jpeg`) at the largest DCT reduction that keeps every box at least its
  output size; each crop resized from its box in uint8 with the reference's kernel (torch's uint8
  bicubic antialias), fed channels-last, where it runs fastest; flip and normalisation batched on
  the accelerator. Exactly the reference's pixels without a reduced decode.
* ``device``: the worker decodes (reduced as above) and draws the boxes; crop, resize
  (``roi_align``, area-averaging), flip and normalisation run batched on the accelerator.

Legend: B batch, V views per image, S view size, H x W image.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mae.images import jpeg
from mae.images.decode import Background, load_rgb, to_rgb
from mae.images.transforms import photometric, random_crop

ViewsImpl = Literal["fast", "torchvision", "device"]
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (its default)


def as_specs(specs) -> list[tuple[int, tuple[float, float]]]:
    """``[(size, (lo, hi)), ...]`` from a list of specs or an object with ``specs()``."""
    specs = specs.specs() if hasattr(specs, "specs") else specs
    return [(int(size), (float(scale[0]), float(scale[1]))) for size, scale in specs]


# ----------------------------------------------------------------------------- boxes
def draw_crops(specs, width: int, height: int) -> list[tuple[tuple[int, int, int, int], int, bool]]:
    """Draw the V crops of ``specs`` on a ``width`` x ``height`` image: ``[(box (left, top, right,
    bottom), output size, flip)]``, by :func:`sample_box` and a fair flip. The draws come from a
    Python generator seeded from torch's random state (one torch call per image, not several per
    crop), so a sample's seed still fixes its crops."""
    rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
    return [(sample_box(rng, width, height, scale), size, rng.random() < 0.5) for size, scale in as_specs(specs)]


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


# ----------------------------------------------------------------------------- decoding for crops
def open_for_crops(src, specs, background: Union[Background, tuple] = "white"):
    """Decode ``src`` (path or bytes) with Pillow just as large as the crops of ``specs`` need.

    Returns ``(rgb, crops)``: the RGB image (:func:`mae.images.decode.to_rgb`), possibly
    DCT-reduced, and the crops drawn on the full-size image with their boxes scaled to ``rgb``."""
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with Image.open(fp) as img:
        W, H = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees once upright
            W, H = H, W
        crops = draw_crops(specs, W, H)
        rgb = _load_reduced(img, reduction_for(crops), background)
    return rgb, _scale_boxes(crops, W, H, rgb.width, rgb.height)


def _load_reduced(img: Image.Image, reduction: int, background="white") -> Image.Image:
    """An opened image decoded at 1 / ``reduction`` where it is a JPEG (Pillow's ``draft``), upright
    RGB. Truncated data raises here."""
    if reduction > 1 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(img.size[0] / reduction), math.ceil(img.size[1] / reduction)))
    img.load()
    return to_rgb(img, background)


def _scale_boxes(crops, W: int, H: int, width: int, height: int) -> list:
    """Crops drawn on a ``W`` x ``H`` image, their boxes scaled to its ``width`` x ``height`` decode."""
    sx, sy = W / width, H / height
    return [((l / sx, t / sy, r / sx, b / sy), size, flip) for (l, t, r, b), size, flip in crops]


def decode_for_crops(src, specs, background: Union[Background, tuple] = "white") -> tuple[np.ndarray, list]:
    """:func:`open_for_crops` as an ``(h, w, 3)`` uint8 array (possibly a strided view): JPEGs
    through :mod:`mae.images.jpeg` (the same pixels, no Pillow image), anything else through
    Pillow (an already open PIL image: at its size). The crops are drawn the same way (one draw per
    image) on every route."""
    if isinstance(src, Image.Image):  # already open: drawn on it as it is
        rgb = to_rgb(src, background)
        return np.array(rgb), draw_crops(specs, *rgb.size)
    data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
    info = jpeg.probe(data)
    if info is None:
        rgb, crops = open_for_crops(data, specs, background)
        return np.array(rgb), crops  # a writable copy: torch takes no read-only arrays
    crops = draw_crops(specs, info.width, info.height)
    s = reduction_for(crops)
    try:
        a = jpeg.decode(data, info, s)
    except ValueError:  # libjpeg warned (e.g. extraneous bytes) or failed: Pillow decides, as on the
        with Image.open(io.BytesIO(data)) as img:  # reference path (it decodes the former, raises
            a = np.array(_load_reduced(img, s))  # for the latter)
    return a, _scale_boxes(crops, info.width, info.height, a.shape[1], a.shape[0])


def _int_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A float box (from a reduced decode) rounded to whole pixels inside the image, at least 1 px."""
    l, t = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    return l, t, max(l + 1, min(round(box[2]), width)), max(t + 1, min(round(box[3]), height))


def resize_uint8(region: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 3, h, w) uint8 -> (1, 3, size, size) uint8 by bicubic antialiased resampling: the kernel
    and pixels of torchvision's resize of uint8 tensors (fastest on channels-last input)."""
    return F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def pil_to_uint8(img) -> torch.Tensor:
    """RGB PIL image or (H, W, 3) uint8 array -> (3, H, W) uint8 tensor, a channels-first view of
    the array (copied only if it is read-only or strided)."""
    a = np.asarray(img, dtype=np.uint8)
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a)
    return torch.from_numpy(a).permute(2, 0, 1)


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """B crops (3, S, S) -> (B, 3, S, S); channels-last crops stay channels-last, a plain copy
    (``torch.stack`` would transpose each one)."""
    if all(v.dim() == 3 and v.stride(0) == 1 and v.stride(2) == 3 for v in views):
        return torch.stack([v.permute(1, 2, 0) for v in views]).permute(0, 3, 1, 2)
    return torch.stack(views)


def normalize_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., 3, H, W) of any layout -> contiguous float32 normalised with ``mean`` / ``std``
    (of [0, 1] pixels); the layout change rides on the conversion's copy."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return out.copy_(x).sub_(m).div_(s)


# ----------------------------------------------------------------------------- the view makers
class Views:
    """The view maker of one ``impl`` (module docstring). Args: ``specs`` (the V views),
    ``mean`` / ``std`` (normalisation of [0, 1] pixels), ``strong`` (SimCLR photometric
    augmentation per crop), ``background`` (what transparent pixels are composited onto)."""

    impl: ViewsImpl

    def __init__(self, specs, mean, std, strong: bool = False, background: Union[Background, tuple] = "white"):
        self.specs, self.mean, self.std = as_specs(specs), tuple(mean), tuple(std)
        self.strong, self.background = strong, background
        if not self.specs:
            raise ValueError("a view maker needs at least one view")

    def __call__(self, src):
        raise NotImplementedError

    def collate(self, items: list):
        raise NotImplementedError

    def finish(self, batch) -> list[torch.Tensor]:
        raise NotImplementedError


class ReferenceViews(Views):
    """``torchvision``: V float crops per sample, normalised in the worker."""

    impl = "torchvision"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.transforms = [random_crop(size, scale, self.mean, self.std, self.strong) for size, scale in self.specs]

    def __call__(self, src) -> list[torch.Tensor]:
        img = load_rgb(src, self.background)
        return [t(img) for t in self.transforms]

    def collate(self, items: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.stack([it[v] for it in items]) for v in range(len(self.specs))]  # V x (B, 3, S, S)

    def finish(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(batch)


class FastViews(Views):
    """``fast``: per sample ``{"views": V uint8 (3, S, S) channels-last, "flips": (V,) bool}``, not
    yet flipped: the flips are batched on the accelerator, where they cost nothing."""

    impl = "fast"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.photometric = {size: photometric(size) for size, _ in self.specs} if self.strong else None

    def __call__(self, src) -> dict:
        a, crops = decode_for_crops(src, self.specs, self.background)
        views = []
        for box, size, _ in crops:
            l, t, r, b = _int_box(box, a.shape[1], a.shape[0])
            region = torch.from_numpy(np.ascontiguousarray(a[None, t:b, l:r])).permute(0, 3, 1, 2)  # channels-last
            crop = resize_uint8(region, size)[0]
            views.append(self.photometric[size](crop) if self.photometric else crop)
        return {"views": views, "flips": torch.tensor([flip for _, _, flip in crops], dtype=torch.bool)}

    def collate(self, items: list[dict]) -> dict:
        return {"views": [stack_views([it["views"][v] for it in items]) for v in range(len(self.specs))],
                "flips": torch.stack([it["flips"] for it in items])}  # V x (B, 3, S, S), (B, V)

    def finish(self, batch: dict) -> list[torch.Tensor]:
        flips = batch["flips"]
        return [normalize_uint8(torch.where(flips[:, v].view(-1, 1, 1, 1), x.flip(-1), x), self.mean, self.std)
                for v, x in enumerate(batch["views"])]


class DeviceViews(Views):
    """``device``: per sample ``{"pixels": uint8 (3, h, w), "boxes": (V, 4), "flips": (V,)}``; the
    batch pads the pixels to its largest image; :meth:`finish` crops ``chunk`` images at a time
    (bounding the float copy of the pixels)."""

    impl = "device"
    chunk = 64

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.strong:
            raise ValueError("strong photometric augmentation runs in the workers: not available with impl=device")

    def __call__(self, src) -> dict:
        a, crops = decode_for_crops(src, self.specs, self.background)
        return {"pixels": pil_to_uint8(a), "boxes": torch.tensor([box for box, _, _ in crops], dtype=torch.float32),
                "flips": torch.tensor([flip for _, _, flip in crops], dtype=torch.bool)}

    def collate(self, items: list[dict]) -> dict:
        """Pixels (B, 3, H, W) uint8, channels-last (the workers' decoded layout, copied without a
        transpose), edge-replicated past each image so that a resample at a box's edge reads the
        image's edge, not zeros; ``boxes`` (B, V, 4) and ``flips`` (B, V)."""
        H = max(it["pixels"].shape[1] for it in items)
        W = max(it["pixels"].shape[2] for it in items)
        pixels = torch.empty(len(items), H, W, 3, dtype=torch.uint8)  # (B, H, W, 3)
        for i, it in enumerate(items):
            p = it["pixels"].permute(1, 2, 0)  # (h, w, 3)
            h, w = p.shape[:2]
            pixels[i, :h, :w] = p
            pixels[i, h:, :w] = p[-1:]
            pixels[i, :, w:] = pixels[i, :, w - 1:w]
        return {"pixels": pixels.permute(0, 3, 1, 2), "boxes": torch.stack([it["boxes"] for it in items]),
                "flips": torch.stack([it["flips"] for it in items])}

    def finish(self, batch: dict) -> list[torch.Tensor]:
        from torchvision.ops import roi_align

        pixels, boxes, flips = batch["pixels"], batch["boxes"], batch["flips"]  # (B,3,H,W) (B,V,4) (B,V)
        B, V = boxes.shape[:2]
        sizes = [size for size, _ in self.specs]
        out: list[list[torch.Tensor]] = [[] for _ in range(V)]
        for lo in range(0, B, self.chunk):
            px = pixels[lo:lo + self.chunk].contiguous().float()  # (b, 3, H, W) in [0, 255], planar for roi_align
            b = px.shape[0]
            idx = torch.arange(b, device=px.device, dtype=torch.float32)
            for size in dict.fromkeys(sizes):  # one roi_align per crop size
                vs = [v for v in range(V) if sizes[v] == size]
                rois = torch.cat([torch.cat([idx[:, None], boxes[lo:lo + b, v]], dim=1) for v in vs])  # (len(vs) b, 5)
                crops = roi_align(px, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
                for k, v in enumerate(vs):
                    c = crops[k * b:(k + 1) * b]
                    out[v].append(torch.where(flips[lo:lo + b, v].view(-1, 1, 1, 1), c.flip(-1), c))
        m = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
        s = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1) * 255.0
        return [(torch.cat(o).clamp_(0, 255) - m) / s for o in out]


IMPLS = {"torchvision": ReferenceViews, "fast": FastViews, "device": DeviceViews}


def make_views(impl: ViewsImpl, specs, mean, std, strong: bool = False,
               background: Union[Background, tuple] = "white") -> Views:
    """The view maker of ``impl`` (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"views impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return IMPLS[impl](specs, mean, std, strong, background)
