"""Encoded image (path or bytes) -> upright RGB: the one rule for every image the models see.

EXIF orientation applied, transparency composited onto a background, converted to RGB. The
background is white for evaluation and user-facing preprocessing; training views may composite
onto a random colour instead (``background="random"``, drawn from torch's random state, so a
sample's seed fixes it), so that a model does not learn the colour transparent pixels get and
behaves the same under other tools' conversions (open_clip's ``.convert("RGB")`` gives black).
"""
from __future__ import annotations

import io
import os
from typing import Literal, Union

import torch
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
Background = Literal["white", "random"]
WHITE = (255, 255, 255)


def background_colour(background: Union[Background, tuple]) -> tuple[int, int, int]:
    """The RGB colour of a ``background`` setting: white, a colour drawn from torch's random state
    (``random``), or an explicit ``(r, g, b)``."""
    if background == "white":
        return WHITE
    if background == "random":
        return tuple(torch.randint(0, 256, (3,)).tolist())
    return tuple(background)


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image, background: Union[Background, tuple] = "white") -> Image.Image:
    """An opened image of any mode (P, RGBA, LA, L, CMYK, ...) as the models see it: the EXIF
    orientation applied, transparency composited onto ``background`` (see
    :func:`background_colour`), converted to RGB. Training loaders, the fast crops, evaluation and
    ``preprocess`` all call this."""
    if img.getexif().get(0x0112, 1) != 1:  # camera JPEGs: apply the EXIF orientation
        img = ImageOps.exif_transpose(img)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background_colour(background), 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(src: str | os.PathLike | bytes, background: Union[Background, tuple] = "white") -> Image.Image:
    """Decode a path or encoded bytes (or take an open PIL image) with :func:`to_rgb`.

    Raises whatever PIL raises for unreadable, truncated or empty input (callers that must not
    crash catch it and count a skip).
    """
    if isinstance(src, Image.Image):
        return to_rgb(src, background)
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with Image.open(fp) as img:
        img.load()  # decode now: truncated data raises here, not later in a transform
        return to_rgb(img, background)


class Decoded:
    """``transform(load_rgb(src))``: a transform of decoded images as a view maker of encoded ones
    (what the image streams call), e.g. ``Decoded(eval_transform(224))``."""

    def __init__(self, transform, background: Union[Background, tuple] = "white"):
        self.transform, self.background = transform, background

    def __call__(self, src):
        return self.transform(load_rgb(src, self.background))
