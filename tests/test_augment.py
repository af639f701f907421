"""Multi-crop views and the evaluation transform on a real bundled emoji."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from clip.data.multicrop import MultiCropConfig, build_multicrop
from mae.images.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, eval_transform


def MultiCrop(cfg):  # the reference views
    from dataclasses import replace

    return build_multicrop(replace(cfg, impl="torchvision"))


def flat(compose):
    out = []
    for t in compose.transforms:
        out += flat(t) if isinstance(t, (v2.Compose, v2.RandomApply)) else [t]
    return out


@pytest.fixture(scope="module")
def emoji(data_dir):
    rgba = Image.open(data_dir / "emoji" / "img" / "1f600.png").convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")  # (136 x 128)


def test_default_multicrop_shapes(emoji):
    torch.manual_seed(0)
    crops = MultiCrop(MultiCropConfig())(emoji)
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 4
    assert all(c.dtype == torch.float32 for c in crops)
    assert not torch.equal(crops[0], crops[1])  # two different random views
    lo = (0 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    hi = (1 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    for c in crops:  # normalised with CLIP's mean / std
        assert (c.amin(dim=(1, 2)) >= lo - 1e-4).all() and (c.amax(dim=(1, 2)) <= hi + 1e-4).all()


def test_plain_clip_is_one_global_crop(emoji):
    crops = MultiCrop(MultiCropConfig(global_crops=1, local_crops=0))(emoji)
    assert len(crops) == 1 and crops[0].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="global_crops >= 1"):
        MultiCrop(MultiCropConfig(global_crops=0))


def test_crop_scales_are_configurable(emoji):
    mc = MultiCrop(MultiCropConfig(global_crops=1, local_crops=1, global_scale=(1.0, 1.0),
                                   local_scale=(0.01, 0.01)))
    rrc = [t for t in flat(mc.transforms[0]) if isinstance(t, v2.RandomResizedCrop)]
    assert rrc[0].scale == (1.0, 1.0)
    assert [t for t in flat(mc.transforms[-1])
            if isinstance(t, v2.RandomResizedCrop)][0].scale == (0.01, 0.01)


def test_strong_switch_changes_pipeline(emoji):
    def kinds(mc):
        return [type(x).__name__ for x in flat(mc.transforms[0])]

    weak, strong = MultiCrop(MultiCropConfig()), MultiCrop(MultiCropConfig(strong=True))
    assert not {"ColorJitter", "RandomGrayscale", "GaussianBlur"} & set(kinds(weak))
    assert {"ColorJitter", "RandomGrayscale", "GaussianBlur"} <= set(kinds(strong))
    jitter = [x for x in flat(strong.transforms[0]) if isinstance(x, v2.ColorJitter)][0]
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    blur = [x for x in flat(strong.transforms[-1]) if isinstance(x, v2.GaussianBlur)][0]
    assert blur.kernel_size == (9, 9)  # ~10% of a 96 px crop, odd
    # same seed, same geometry: the strong pipeline gives different pixels at least once
    differ = []
    for seed in range(4):
        torch.manual_seed(seed)
        a = weak(emoji)[0]
        torch.manual_seed(seed)
        b = weak(emoji)[0]
        assert torch.equal(a, b)  # reproducible under a seed
        torch.manual_seed(seed)
        differ.append(not torch.allclose(strong(emoji)[0], a))
    assert any(differ)


def test_eval_transform_resize_and_center_crop(emoji):
    x = eval_transform(224)(emoji)
    assert x.shape == (3, 224, 224)
    # a 100 x 50 image: shorter side -> 64, center crop keeps the middle
    img = Image.new("RGB", (100, 50), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 20, 50))  # -> resized columns 0..25.6: outside the crop 32..96
    img.paste((0, 0, 0), (45, 0, 55, 50))  # -> 57.6..70.4: crop columns 25.6..38.4
    y = eval_transform(64, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert y.shape == (3, 64, 64)
    assert y[:, :, :22].min() > 0.95 and y[:, :, 42:].min() > 0.95  # left band cropped away
    assert y[:, :, 28:36].max() < 0.05  # the middle stripe is kept, in the middle


@pytest.mark.parametrize("impl", ["torchvision", "fast", "device"])
def test_transparent_pixels_take_the_background(impl, tmp_path):
    """A fully transparent PNG whose hidden pixels are black: every view is the background colour,
    white by default, one random colour per image and draw with ``background: random``."""
    from mae.images.views import make_views

    path = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(path)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # pixel p in [0, 1] -> 2p - 1
    specs = [(32, (0.5, 1.0)), (16, (0.2, 0.5))]

    def views(background: str) -> list[torch.Tensor]:
        v = make_views(impl, specs, mean, std, background=background)
        return v.finish(v.collate([v(str(path)) for _ in range(8)]))  # V x (8, 3, S, S)

    torch.manual_seed(0)
    for crops in views("white"):
        torch.testing.assert_close(crops, torch.ones_like(crops), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    colours = []
    for crops in views("random"):
        flat_ = crops.flatten(2)  # (8, 3, S*S): one colour per image, the same in every view
        assert (flat_.amax(-1) - flat_.amin(-1)).max() < 1e-6
        colours.append(flat_[:, :, 0])
    torch.testing.assert_close(colours[0], colours[1])
    assert len({tuple(c) for c in colours[0].tolist()}) == 8  # eight images, eight colours
    assert not torch.allclose(colours[0], torch.ones_like(colours[0]))
