"""KELIP's multi-crop views of the CLIP stage (Caron et al. 2020's multi-crop, used by KELIP).

Each training image becomes G global crops at 224 px and K local crops at 96 px (RandomResizedCrop
over ``global_scale`` / ``local_scale`` of the area, plus a horizontal flip). The ViT reads 96 px
crops with bicubic-resized position embeddings (a 3x3 grid for /32), so a local crop costs about a
fifth of a global one. EVERY crop's embedding is contrasted with the batch's texts
(``clip.model.loss``, image features (V, B, E), V = G + K) and the V crop losses are averaged;
crops are never contrasted with each other. G/K = 1/0 is plain CLIP.

``strong`` adds SimCLR's photometric augmentation (:func:`mae.images.transforms.photometric`). It
is off by default: KELIP found it helps zero-shot classification but hurts retrieval.
``impl`` picks the crop engine (:mod:`mae.images.views`: ``torchvision``, ``fast``, ``device``);
``mean`` / ``std`` normalise the pixels and travel with the trained model (``model.image_mean``,
``model.image_std``); ``background`` is what transparent pixels are composited onto in training
(``random``: a random colour per image, for all its crops; evaluation always uses white). At demo
scale ``random`` halves held-out recall and leaves the model as dependent on the colour as before
(README, "Transparent images under open_clip's own preprocess"), so white is the default.
"""
from __future__ import annotations

from dataclasses import dataclass

from mae.images.decode import Background
from mae.images.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from mae.images.views import Views, ViewsImpl, make_views


@dataclass(frozen=True)
class MultiCropConfig:
    """Number, size and area range of the global and local crops, the crop engine, the pixel
    normalisation and the background of transparent images (module docstring)."""

    global_crops: int = 2
    local_crops: int = 4
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    strong: bool = False
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    impl: ViewsImpl = "fast"
    background: Background = "white"

    def __post_init__(self):
        if self.global_crops < 1:
            raise ValueError(f"global_crops >= 1 is needed (the crop at the model's size), got {self.global_crops}")
        if self.local_crops < 0:
            raise ValueError(f"local_crops must be >= 0, got {self.local_crops}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must be an area range 0 < min <= max <= 1, got {[lo, hi]}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {list(self.std)}")
        if self.strong and self.impl == "device":
            raise ValueError("strong photometric augmentation runs in the workers: it needs impl=fast or "
                             "impl=torchvision, not device")

    def specs(self) -> list[tuple[int, tuple[float, float]]]:
        """(output size, area range) of each of the V = G + K crops, globals first."""
        return ([(self.global_size, tuple(self.global_scale))] * self.global_crops
                + [(self.local_size, tuple(self.local_scale))] * self.local_crops)


def build_multicrop(cfg: MultiCropConfig, background: Background | None = None) -> Views:
    """The view maker of ``cfg`` (``background`` overrides ``cfg.background``, e.g. white for
    held-out data)."""
    return make_views(cfg.impl, cfg.specs(), cfg.mean, cfg.std, cfg.strong, background or cfg.background)

