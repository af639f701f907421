"""Random-resized-crop views decoded only as large as they need, for both stages.

The ``fast`` and ``device`` paths of ``clip.augment`` (which documents them) and of the MAE
stage's single view: crop boxes drawn first, by torchvision's RandomResizedCrop algorithm, from the
image header; JPEGs decoded (:mod:`mae.jpeg`, else Pillow) at the largest DCT reduction that keeps
every box at least its output size; each crop resized from its box in uint8 (``fast``, in the
worker) or batched on the accelerator with ``roi_align`` (``device``); normalised on the device by
:func:`finish_views`.

The fast crops are channels-last (the layout torch's uint8 antialiased resize runs fastest on,
~2x its planar speed): ``(3, S, S)`` views of ``(S, S, 3)`` memory, batched by :func:`stack_views`
without a transpose, flipped on the device and made planar float by :func:`normalize_uint8`.

A view spec is ``(output size, (min area, max area))``; ``specs`` is a list of them or anything
with a ``specs()`` method (``clip.augment.MultiCropConfig``).
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mae import jpeg
from mae.data import to_rgb

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (its default)


def as_specs(specs) -> list[tuple[int, tuple[float, float]]]:
    """``[(size, (lo, hi)), ...]`` from a list of specs or an object with ``specs()``."""
    specs = specs.specs() if hasattr(specs, "specs") else specs
    return [(int(size), (float(scale[0]), float(scale[1]))) for size, scale in specs]


def draw_crops(specs, width: int, height: int) -> list[tuple[tuple[int, int, int, int], int, bool]]:
    """Draw the V crops of ``specs`` (see :func:`as_specs`) on a ``width`` x ``height`` image: ``[(box (left, top, right, bottom), output
    size, flip)]``, by torchvision's RandomResizedCrop algorithm (:func:`sample_box`) and a fair
    flip. The draws come from a Python generator seeded from torch's random state, one torch call
    per image instead of ~10 per crop, so a sample's seed still fixes its crops."""
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


def open_for_crops(src, specs):
    """Decode ``src`` (path, bytes or a PIL image) just as large as the crops of ``specs`` need.

    Returns ``(rgb, crops)``: the RGB image (EXIF orientation applied, transparency flattened
    onto white, as :func:`mae.data.load_rgb`), possibly DCT-reduced, and the crops drawn on the
    full-size image with their boxes scaled to ``rgb`` (floats)."""
    if isinstance(src, Image.Image):
        rgb = to_rgb(src)
        return rgb, draw_crops(specs, *rgb.size)
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with Image.open(fp) as img:
        W, H = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees once upright
            W, H = H, W
        crops = draw_crops(specs, W, H)
        rgb = _load_reduced(img, reduction_for(crops))
    return rgb, _scale_boxes(crops, W, H, rgb.width, rgb.height)


def _load_reduced(img: Image.Image, reduction: int) -> Image.Image:
    """An opened image decoded at 1 / ``reduction`` where it is a JPEG (Pillow's ``draft``), as
    :func:`mae.data.load_rgb` returns it (upright RGB). Truncated data raises here."""
    if reduction > 1 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(img.size[0] / reduction), math.ceil(img.size[1] / reduction)))
    img.load()
    return to_rgb(img)


def _scale_boxes(crops, W: int, H: int, width: int, height: int) -> list:
    """Crops drawn on a ``W`` x ``H`` image, their boxes scaled to its ``width`` x ``height`` decode."""
    sx, sy = W / width, H / height
    return [((l / sx, t / sy, r / sx, b / sy), size, flip) for (l, t, r, b), size, flip in crops]


def decode_for_crops(src, specs) -> tuple[np.ndarray, list]:
    """:func:`open_for_crops` as an ``(h, w, 3)`` uint8 array (possibly a strided view): JPEG bytes
    or files through :mod:`mae.jpeg` (the same pixels, no Pillow image), anything else through
    Pillow. The crops are drawn the same way (one draw per image) on either route."""
    if not isinstance(src, Image.Image):
        data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
        info = jpeg.probe(data)
        if info is not None:
            crops = draw_crops(specs, info.width, info.height)
            s = reduction_for(crops)
            try:
                a = jpeg.decode(data, info, s)
            except ValueError:  # libjpeg warned (e.g. extraneous bytes) or failed: Pillow decides, as on the
                with Image.open(io.BytesIO(data)) as img:  # reference path (it decodes the former, raises
                    a = np.asarray(_load_reduced(img, s))  # for the latter)
            return a, _scale_boxes(crops, info.width, info.height, a.shape[1], a.shape[0])
        src = data
    rgb, crops = open_for_crops(src, specs)
    return np.asarray(rgb), crops


# torch's uint8 bicubic antialiased resize, the kernel torchvision's resize calls for uint8 tensors
# (called directly: the Python wrappers cost ~10 us per crop, 5 % of a sample at 256 px)
_resize_aa = torch.ops.aten._upsample_bicubic2d_aa


class FastCrops:
    """The ``fast`` path: ``FastCrops(specs)(src) -> {"views": V uint8 (3, S, S), "flips": (V,) bool}``
    from a path, encoded bytes or a PIL image (reduced decoding needs the first two). The views are
    channels-last and not yet flipped: :func:`finish_views` flips and normalises the batch on the
    device (flipping in the worker cost ~5 % of a sample's time there; it is free on a GPU);
    :func:`apply_flips` gives the final crops on the host. ``photometric``: size -> a uint8 tensor
    transform applied to each crop of that size (pixelwise or symmetric, so it commutes with the
    flip). Batch with :func:`collate_views`."""

    takes_encoded = True  # the streams hand over the path or bytes, not a decoded image

    def __init__(self, specs, photometric: dict | None = None):
        self.specs, self.photometric = as_specs(specs), photometric

    def __call__(self, src) -> dict:
        a, crops = decode_for_crops(src, self.specs)
        views = []
        for box, size, _ in crops:
            l, t, r, b = _int_box(box, a.shape[1], a.shape[0])
            region = torch.from_numpy(np.ascontiguousarray(a[None, t:b, l:r])).permute(0, 3, 1, 2)  # channels-last
            crop = _resize_aa(region, [size, size], False)[0]  # the reference's kernel and pixels
            views.append(self.photometric[size](crop) if self.photometric else crop)
        return {"views": views, "flips": torch.tensor([flip for _, _, flip in crops], dtype=torch.bool)}


def apply_flips(item: dict) -> list[torch.Tensor]:
    """The final crops of one :class:`FastCrops` output, flipped where drawn (on the host)."""
    return [v.flip(-1) if f else v for v, f in zip(item["views"], item["flips"].tolist())]


def pil_to_uint8(img) -> torch.Tensor:
    """RGB PIL image or (H, W, 3) uint8 array -> (3, H, W) uint8 tensor, a channels-first view of
    the array (copied only if it is read-only or strided)."""
    a = np.asarray(img, dtype=np.uint8)
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a)
    return torch.from_numpy(a).permute(2, 0, 1)


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """B crops (3, S, S) -> (B, 3, S, S); channels-last crops (:class:`FastCrops`) stay
    channels-last, a plain copy (``torch.stack`` would transpose each one)."""
    if all(v.dim() == 3 and v.stride(0) == 1 and v.stride(2) == 3 for v in views):
        return torch.stack([v.permute(1, 2, 0) for v in views]).permute(0, 3, 1, 2)
    return torch.stack(views)


def collate_views(items: list):
    """Per-sample outputs of a view transform -> the batch :func:`finish_views` takes:

    * V crops per sample (a list, or one tensor: one view) -> V ``(B, 3, S, S)`` batches;
    * :class:`FastCrops` dicts -> ``{"views": V (B, 3, S, S) uint8, "flips": (B, V) bool}``;
    * :class:`DeviceCrops` dicts -> :func:`collate_pending`.
    """
    if isinstance(items[0], dict) and "pixels" in items[0]:
        return collate_pending(items)
    fast = isinstance(items[0], dict)
    views = [it["views"] if fast else it if isinstance(it, (list, tuple)) else [it] for it in items]
    V = len(views[0])
    if any(len(v) != V for v in views):
        raise ValueError("samples in one batch have different numbers of crops")
    batches = [stack_views([v[i] for v in views]) for i in range(V)]  # V x (B, 3, S, S)
    return {"views": batches, "flips": torch.stack([it["flips"] for it in items])} if fast else batches


def _int_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A float box (from a reduced decode) rounded to whole pixels inside the image, at least 1 px."""
    l, t = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    return l, t, max(l + 1, min(round(box[2]), width)), max(t + 1, min(round(box[3]), height))


class DeviceCrops:
    """The ``device`` path, the worker's half: ``(src) -> {"pixels": uint8 (3, h, w), "boxes": (V, 4)
    float, "flips": (V,) bool}``; :func:`collate_pending` batches these and :func:`finish_views`
    crops them on the accelerator."""

    takes_encoded = True

    def __init__(self, specs):
        self.specs = as_specs(specs)

    def __call__(self, src) -> dict:
        a, crops = decode_for_crops(src, self.specs)
        return {"pixels": pil_to_uint8(a),
                "boxes": torch.tensor([box for box, _, _ in crops], dtype=torch.float32),
                "flips": torch.tensor([flip for _, _, flip in crops], dtype=torch.bool)}


def collate_pending(items: list[dict]) -> dict:
    """Batch :class:`DeviceCrops` outputs: pixels padded to the largest image, (B, 3, H, W) uint8
    (channels-last: the workers' decoded layout, copied without a transpose), with ``boxes``
    (B, V, 4) and ``flips`` (B, V)."""
    H = max(it["pixels"].shape[1] for it in items)
    W = max(it["pixels"].shape[2] for it in items)
    pixels = torch.empty(len(items), H, W, 3, dtype=torch.uint8)  # (B, H, W, 3)
    for i, it in enumerate(items):
        p = it["pixels"].permute(1, 2, 0)  # (h, w, 3)
        h, w = p.shape[:2]
        pixels[i, :h, :w] = p
        pixels[i, h:, :w] = p[-1:]  # edge-replicated padding: the resample at a box's edge
        pixels[i, :, w:] = pixels[i, :, w - 1:w]  # reads the image's edge, not zeros
    return {"pixels": pixels.permute(0, 3, 1, 2), "boxes": torch.stack([it["boxes"] for it in items]),
            "flips": torch.stack([it["flips"] for it in items])}


def normalize_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., 3, H, W) of any layout -> contiguous float32 normalised with ``mean`` / ``std``
    (of [0, 1] pixels); the layout change rides on the conversion's copy."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return out.copy_(x).sub_(m).div_(s)


def finish_views(images, specs, mean, std, chunk: int = 64) -> list[torch.Tensor]:
    """The training step's view of a batch's images, on whatever device they are: V float
    (B, 3, S, S) crop batches. Float crops pass unchanged, uint8 crops are normalised (``mean`` /
    ``std`` of [0, 1] pixels), a fast batch (:func:`collate_views`) is flipped and normalised, a
    device batch (:func:`collate_pending`) is cropped, resized, flipped and normalised here,
    ``chunk`` images at a time (bounds the float copy of the pixels)."""
    if isinstance(images, dict) and "pixels" in images:
        return _device_crops(images, as_specs(specs), mean, std, chunk)
    if isinstance(images, dict):
        flips = images["flips"]
        return [normalize_uint8(torch.where(flips[:, v].view(-1, 1, 1, 1), x.flip(-1), x), mean, std)
                for v, x in enumerate(images["views"])]
    if isinstance(images, torch.Tensor):
        images = [images]
    return [normalize_uint8(x, mean, std) if x.dtype == torch.uint8 else x for x in images]


def _device_crops(batch: dict, specs, mean, std, chunk: int) -> list[torch.Tensor]:
    from torchvision.ops import roi_align

    pixels, boxes, flips = batch["pixels"], batch["boxes"], batch["flips"]  # (B,3,H,W) (B,V,4) (B,V)
    B, V = boxes.shape[:2]
    sizes = [size for size, _ in specs]
    if len(sizes) != V:
        raise ValueError(f"device batch has {V} crops per image, the view specs {len(sizes)}")
    out: list[list[torch.Tensor]] = [[] for _ in range(V)]
    for lo in range(0, B, chunk):
        px = pixels[lo:lo + chunk].contiguous().float()  # (b, 3, H, W) in [0, 255], planar for roi_align
        b = px.shape[0]
        idx = torch.arange(b, device=px.device, dtype=torch.float32)
        for size in dict.fromkeys(sizes):  # one roi_align per crop size
            vs = [v for v in range(V) if sizes[v] == size]
            rois = torch.cat([torch.cat([idx[:, None], boxes[lo:lo + b, v]], dim=1) for v in vs])  # (len(vs) b, 5)
            crops = roi_align(px, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            for k, v in enumerate(vs):
                c = crops[k * b:(k + 1) * b]
                out[v].append(torch.where(flips[lo:lo + b, v].view(-1, 1, 1, 1), c.flip(-1), c))
    m = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1) * 255.0
    return [(torch.cat(o).clamp_(0, 255) - m) / s for o in out]
