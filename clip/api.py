"""The Python API, in the conventions of OpenAI's ``clip`` and ``open_clip``::

    import clip
    model, preprocess = clip.load("runs/clip")          # a run folder, clip_ckpt.pt or an export folder
    tokenizer = clip.get_tokenizer("runs/clip")         # its tokenizer, at the model's context length
    image_features = model.encode_image(preprocess(pil_image)[None], normalize=True)
    text_features = model.encode_text(tokenizer(["a dog", "개"]), normalize=True)

``preprocess`` takes a PIL image of any mode (palette, RGBA, LA, L, CMYK, RGB) and gives exactly
the pixels of evaluation (:func:`mae.images.decode.to_rgb`: EXIF orientation, transparency onto
white, RGB; then :func:`clip.eval.encode.eval_view`: the model's size and the normalisation it was
trained with). A path is found by :func:`clip.model.checkpoint.locate`.
"""
from __future__ import annotations

import os

import torch
from PIL import Image

from mae.images.decode import load_rgb, to_rgb


class Preprocess:
    """PIL image of any mode (or a path / encoded bytes) -> (3, S, S) float tensor, normalised.

    Args:
        transform: the tensor pipeline applied to the RGB image.
    """

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = to_rgb(image)
        elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            image = load_rgb(image)
        else:
            raise TypeError(f"preprocess takes a PIL image, a path or encoded bytes, got {type(image).__name__}")
        return self.transform(image)

    def __repr__(self) -> str:
        return f"Preprocess(to_rgb -> {self.transform})"


def image_transform(model_cfg, is_train: bool = False) -> Preprocess:
    """The user-facing transform of a model (its ``CLIPConfig``): the evaluation view (or, with
    ``is_train``, one global crop of the CLIP stage's default multi-crop) at its size, with its
    normalisation, behind the loaders' RGB conversion."""
    from clip.eval.encode import eval_view

    if is_train:
        from clip.data.multicrop import MultiCropConfig
        from mae.images.transforms import random_crop

        return Preprocess(random_crop(model_cfg.vision.img_size, MultiCropConfig().global_scale, model_cfg.image_mean,
                                      model_cfg.image_std))
    return Preprocess(eval_view(model_cfg))


def load(name: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, preprocess)`` as OpenAI's ``clip.load``: the model in eval mode on ``device``.

    With ``tokenizer/`` beside the checkpoint, a checkpoint trained with another tokenizer is refused.
    """
    from clip.model.checkpoint import load_clip_and_tokenizer

    model, _ = load_clip_and_tokenizer(name, device=device, require_tokenizer=False)
    return model, image_transform(model.cfg)


def create_model_and_transforms(model_name: str | os.PathLike | None = None, pretrained: str | os.PathLike | None = None,
                                device: str | torch.device = "cpu"):
    """``(model, preprocess_train, preprocess_val)`` as open_clip's function of that name.
    ``model_name`` (or ``pretrained``, as open_clip users pass the weights) is a run folder, an
    export folder or a checkpoint file."""
    path = pretrained if pretrained is not None else model_name
    if path is None:
        raise ValueError("create_model_and_transforms needs a run folder, export folder or checkpoint file")
    model, preprocess = load(path, device)
    return model, image_transform(model.cfg, is_train=True), preprocess


def create_model(model_name: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model alone (eval mode), as ``open_clip.create_model``."""
    return load(model_name, device)[0]


def get_tokenizer(name: str | os.PathLike, context_length: int | None = None):
    """The tokenizer of a run or export (its ``tokenizer/``), encoding to the model's context length
    unless ``context_length`` is given: ``tokenizer(["a dog", "개"])`` -> (B, T) ids for ``encode_text``."""
    from clip.model.checkpoint import config_from_dict, locate, read_meta
    from clip.model.tokens import load_text_tokenizer

    ckpt, tok_dir = locate(name)
    meta = read_meta(name)
    tok = load_text_tokenizer(tok_dir, context_length or config_from_dict(meta["config"], str(ckpt)).text.context_length)
    trained = meta.get("tokenizer")
    if trained and trained != tok.fingerprint:
        raise ValueError(f"{ckpt} was trained with tokenizer {trained}, not the one in {tok_dir} ({tok.fingerprint})")
    return tok
