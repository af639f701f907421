"""The JPEG route of the fast view paths (mae/images/jpeg.py) gives Pillow's pixels: every EXIF
orientation, greyscale, DCT-reduced sizes; what it cannot vouch for goes to Pillow; corrupt data
raises; channels-last crops batch and normalise to the planar reference values."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mae.images import jpeg
from mae.images.decode import load_rgb
from mae.images.views import decode_for_crops, draw_crops, normalize_uint8, stack_views
from reference import apply_flips, fast_views


def encode(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo(data_dir) -> Image.Image:
    with Image.open(data_dir / "photos" / "chelsea.jpg") as im:  # 451 x 300: odd sides
        return im.convert("RGB")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_pillows_upright_pixels(photo, orientation):
    exif = Image.Exif()
    exif[jpeg.ORIENTATION_TAG] = orientation
    data = encode(photo, exif=exif.tobytes())
    info = jpeg.probe(data)
    want = np.asarray(load_rgb(data))  # Pillow decode + exif_transpose
    assert info is not None and info.orientation == orientation
    assert (info.height, info.width) == want.shape[:2]
    assert np.array_equal(jpeg.decode(data, info), want)


def test_greyscale_progressive_444_and_reduced_decodes_equal_pillow(photo, data_dir):
    for data in (encode(photo.convert("L")), encode(photo, progressive=True), encode(photo, subsampling=0),
                 encode(photo, subsampling=1)):
        assert np.array_equal(jpeg.decode(data, jpeg.probe(data)), np.asarray(load_rgb(data)))
    data = (data_dir / "photos" / "coffee.jpg").read_bytes()  # 600 x 400: Pillow's draft reduces it too
    info = jpeg.probe(data)
    for s in (2, 4, 8):
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (600 // s, 400 // s))
            want = np.asarray(im.convert("RGB"))
        got = jpeg.decode(data, info, s)
        assert got.shape == want.shape == (-(-400 // s), -(-600 // s), 3)
        assert np.array_equal(got, want)


def test_what_it_cannot_vouch_for_goes_to_pillow(photo, data_dir):
    png = io.BytesIO()
    photo.save(png, "PNG")
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    for data in (png.getvalue(), encode(photo.convert("CMYK")), b"not an image", b"\xff\xd8\xff",
                 encode(photo, xmp=xmp)):
        assert jpeg.probe(data) is None
    xmp_data = encode(photo, xmp=xmp)  # Pillow turns it upright: so must the fast path
    a, _ = decode_for_crops(xmp_data, [(96, (0.5, 1.0))])
    assert np.array_equal(a, np.asarray(load_rgb(xmp_data))) and a.shape[:2] == (451, 300)
    plain_xmp = encode(photo, xmp=b"<x:xmpmeta/>")
    assert jpeg.probe(plain_xmp) == (451, 300, 1)


def test_corrupt_data_raises_and_what_pillow_reads_is_kept(data_dir):
    """Truncated data raises (the stream skips and counts it); data that libjpeg only warns about
    (extraneous bytes before the end marker, common on the web) is decoded by Pillow, as the
    reference path decodes it, with the same crops."""
    data = (data_dir / "photos" / "chelsea.jpg").read_bytes()
    noisy = data[:-2] + b"\x00\x00\x00" + data[-2:]
    with pytest.raises(ValueError):
        jpeg.decode(noisy, jpeg.probe(noisy))
    a, crops = decode_for_crops(noisy, [(96, (0.5, 1.0))])
    assert np.array_equal(a, np.asarray(load_rgb(noisy)))
    half = data[: len(data) // 2]
    info = jpeg.probe(half)  # the header is intact
    assert info is not None
    with pytest.raises(ValueError):
        jpeg.decode(half, info)
    with pytest.raises(Exception):
        fast_views([(96, (0.5, 1.0))])(half)  # the streams count it as a skipped sample


def test_fast_crops_of_a_rotated_jpeg_are_the_reference_crops(photo):
    """Channels-last crops through the JPEG route equal torchvision's resize of Pillow's upright
    image for the same boxes; batched and normalised they equal the planar path's values."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    exif = Image.Exif()
    exif[jpeg.ORIENTATION_TAG] = 6
    data = encode(photo.resize((300, 200)), exif=exif.tobytes())  # upright 200 x 300: no reduction
    full = F.pil_to_tensor(load_rgb(data))
    specs = [(224, (0.4, 1.0)), (96, (0.05, 0.4))]
    torch.manual_seed(3)
    item = fast_views(specs)(data)
    out = apply_flips(item)
    torch.manual_seed(3)
    boxes = draw_crops(specs, full.shape[-1], full.shape[-2])
    for c, ((l, t, r, b), size, flip) in zip(out, boxes):
        ref = F.resized_crop(full, t, l, b - t, r - l, [size, size], interpolation=InterpolationMode.BICUBIC,
                             antialias=True)
        assert torch.equal(c, ref.flip(-1) if flip else ref)
    assert all(v.permute(1, 2, 0).is_contiguous() for v in item["views"])  # channels-last
    batch = stack_views([out[0], out[0].flip(-1)])
    assert batch.shape == (2, 3, 224, 224) and batch.permute(0, 2, 3, 1).is_contiguous()
    planar = torch.stack([out[0].contiguous(), out[0].flip(-1).contiguous()])
    assert torch.equal(batch, planar)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    x = normalize_uint8(batch, mean, std)
    assert x.is_contiguous() and torch.equal(x, normalize_uint8(planar, mean, std))
