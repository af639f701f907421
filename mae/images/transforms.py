"""The torchvision transforms of both stages: the evaluation view, the reference random crop and
SimCLR's photometric augmentation, and the default pixel statistics.

The reference crop (v2 ``RandomResizedCrop``, bicubic with antialias, on uint8 tensors, then a
flip) is what ``impl: torchvision`` runs and what the fast and device paths of
:mod:`mae.images.views` are tested against.
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

# OpenAI CLIP's pixel statistics (open_clip's OPENAI_DATASET_MEAN / STD): the default of both
# stages, so that the encoder sees one pixel distribution in MAE pretraining and CLIP training.
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


def eval_transform(img_size: int = 224, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> v2.Compose:
    """The deterministic view of an RGB image: shorter side to ``img_size`` (bicubic, antialias),
    centre ``img_size`` x ``img_size`` crop, normalised with ``mean`` / ``std`` of [0, 1] pixels."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def photometric(size: int) -> v2.Compose:
    """SimCLR's photometric augmentation for a crop of ``size`` px: colour jitter 0.4/0.4/0.4/0.1
    (p 0.8), grayscale (p 0.2), Gaussian blur with sigma in [0.1, 2] and an odd kernel of ~10 % of
    the crop (p 0.5). Pixelwise or symmetric, so it commutes with a horizontal flip; works on uint8
    and float tensors."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
    ])


def random_crop(size: int, scale: tuple[float, float], mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                strong: bool = False) -> v2.Compose:
    """The reference random view of an RGB image: RandomResizedCrop (area ``scale``, aspect 3/4-4/3,
    bicubic, antialias) + horizontal flip [+ :func:`photometric` with ``strong``] + normalise."""
    ops = [v2.ToImage(),  # uint8 tensor: the geometric and colour ops run on tensors, not PIL
           v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True),
           v2.RandomHorizontalFlip()]
    if strong:
        ops.append(photometric(size))
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
