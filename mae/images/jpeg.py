"""JPEG decoding straight to an upright RGB array, DCT-reduced on request, for the fast view paths.

:mod:`mae.images.views` decodes most training images through here: ``simplejpeg`` (libjpeg-turbo, the
library Pillow decodes with, so the pixels are Pillow's) into a ``(H, W, 3)`` uint8 array, without
Pillow's image object, its header parsing and its copy to an array.
:func:`probe` reads what the crops must be drawn on (the upright size) from the markers; files it
cannot vouch for give None and the caller decodes them with Pillow (:func:`mae.images.decode.load_rgb`):
not a JPEG, CMYK or YCCK (Adobe's inverted ink needs Pillow's handling), markers that do not
parse, or an orientation in an XMP block.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a declared dependency; without it every image goes to Pillow
    simplejpeg = None

ORIENTATION_TAG = 0x0112


class JpegInfo(NamedTuple):
    width: int  # upright (EXIF orientation applied), as the crops are drawn
    height: int
    orientation: int  # EXIF 1..8 (1: as stored)


def probe(data: bytes) -> Optional[JpegInfo]:
    """The upright size and EXIF orientation of a JPEG this module decodes, or None (see the
    module docstring): never raises for bad bytes (the decode that follows reports them)."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        orientation = _orientation(data)
        if orientation is None:
            return None
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, struct.error, IndexError):
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    return JpegInfo(h, w, orientation) if orientation in (5, 6, 7, 8) else JpegInfo(w, h, orientation)


def decode(data: bytes, info: JpegInfo, reduction: int = 1) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB, upright, decoded at 1 / ``reduction`` (1, 2, 4, 8: DCT scaling, the
    size Pillow's ``draft`` gives: ``ceil(side / reduction)``). Raises ValueError for corrupt or
    truncated data (libjpeg's warnings are errors, as Pillow's truncated-image error)."""
    w, h = (info.height, info.width) if info.orientation in (5, 6, 7, 8) else (info.width, info.height)
    kw = {"min_width": -(-w // reduction), "min_height": -(-h // reduction)} if reduction > 1 else {}
    return upright(simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **kw), info.orientation)


def upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an (H, W, C) array as ``PIL.ImageOps.exif_transpose`` does
    (a view: flips and transposes only)."""
    t = {1: lambda x: x, 2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
         5: lambda x: x.transpose(1, 0, 2), 6: lambda x: x.transpose(1, 0, 2)[:, ::-1],
         7: lambda x: x[::-1, ::-1].transpose(1, 0, 2), 8: lambda x: x.transpose(1, 0, 2)[::-1]}
    return t.get(orientation, t[1])(a)


def _orientation(data: bytes) -> Optional[int]:
    """EXIF orientation from the segments before the first scan: 1 without one, None where Pillow
    might read it elsewhere (an XMP block naming an orientation) or the markers do not parse."""
    pos, n, orientation = 2, len(data), 1
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # the first scan: Pillow reads no metadata beyond it either
            return orientation
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xE1:
            body = data[pos + 4:pos + 2 + length]
            if body.startswith(b"Exif\x00\x00"):
                orientation = _tiff_orientation(body[6:])
                if orientation is None:
                    return None
            elif b"Orientation" in body:  # XMP's tiff:Orientation, which Pillow also reads
                return None
        pos += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> Optional[int]:
    """Tag 0x0112 of IFD0 of an EXIF TIFF block (1 when absent), None if it does not parse."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return None
    ifd = struct.unpack(order + "I", tiff[4:8])[0]
    count = struct.unpack(order + "H", tiff[ifd:ifd + 2])[0]
    for i in range(count):
        entry = tiff[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        if len(entry) < 12:
            return None
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag == ORIENTATION_TAG:
            value = struct.unpack(order + "H", entry[8:10])[0] if kind == 3 else \
                struct.unpack(order + "I", entry[8:12])[0] if kind == 4 else None
            return value if value in range(1, 9) else 1
    return 1
