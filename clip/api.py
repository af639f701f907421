"""The Python API, in the conventions of OpenAI's ``clip`` and ``open_clip``::

    import clip
    model, preprocess = clip.load("runs/clip")          # a run folder, clip_ckpt.pt or an export folder
    tokenizer = clip.get_tokenizer("runs/clip")         # its tokenizer, at the model's context length
    image_features = model.encode_image(preprocess(pil_image)[None], normalize=True)
    text_features = model.encode_text(tokenizer(["a dog", "개"]), normalize=True)

``preprocess`` takes a PIL image of any mode (palette, RGBA, LA, L, CMYK, RGB) and gives exactly
the pixels of the training and evaluation path (:func:`mae.data.load_rgb`: EXIF orientation,
transparency flattened onto white, RGB; then :func:`mae.data.eval_transform`).

What a path may be (:func:`locate`): a run folder holding ``clip_ckpt.pt`` (or a
``save_pretrained`` folder holding ``config.json`` + ``model.safetensors``) and ``tokenizer/``,
or the checkpoint file itself with ``tokenizer/`` beside it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from mae.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from mae.data import CLIP_MEAN, CLIP_STD, eval_transform, load_rgb, to_rgb

CKPT_FILE = "clip_ckpt.pt"


def locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint, tokenizer folder)`` of a run folder, an export folder or a checkpoint file.
    FileNotFoundError (one line) when there is no CLIP checkpoint at ``path``."""
    p = Path(path)
    if p.is_dir():
        if (p / CKPT_FILE).is_file():
            return p / CKPT_FILE, p / "tokenizer"
        if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
            return p, p / "tokenizer"
        raise FileNotFoundError(f"no CLIP checkpoint in {p}: expected {CKPT_FILE}, or {CONFIG_FILE} + {WEIGHTS_FILE}")
    if p.is_file():
        return p, p.parent / "tokenizer"
    raise FileNotFoundError(f"CLIP checkpoint not found: {p}")


def read_config(path: str | os.PathLike) -> dict:
    """The saved ``{"config": ..., "tokenizer": fingerprint}`` of a checkpoint, without its weights."""
    ckpt, _ = locate(path)
    if ckpt.is_dir() or ckpt.suffix == ".safetensors":
        folder = ckpt if ckpt.is_dir() else ckpt.parent
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    from mae.checkpoint import CLIP_FORMAT, load_checkpoint

    meta = load_checkpoint(ckpt, CLIP_FORMAT)  # weights-only; the tensors are dropped right away
    return {k: v for k, v in meta.items() if k != "model"}


class Preprocess:
    """PIL image of any mode (or a path / encoded bytes) -> (3, S, S) float tensor, normalised.

    Args:
        transform: the tensor pipeline applied to the RGB image (default: the evaluation view).
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


def image_transform(image_size: int, is_train: bool = False, mean=CLIP_MEAN, std=CLIP_STD) -> Preprocess:
    """The user-facing transform: :func:`mae.data.eval_transform` (or, with ``is_train``, one global
    crop of the CLIP stage's default multi-crop) behind the training loader's RGB conversion."""
    if is_train:
        from clip.augment import MultiCropConfig, crop_transform

        cfg = MultiCropConfig()
        return Preprocess(crop_transform(image_size, cfg.global_scale, cfg.strong, mean, std))
    return Preprocess(eval_transform(image_size, mean, std))


def load(name: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, preprocess)`` as OpenAI's ``clip.load``: the model in eval mode on ``device``.

    With ``tokenizer/`` beside the checkpoint, a checkpoint trained with another tokenizer is refused.
    """
    from clip.model import load_clip

    ckpt, tok_dir = locate(name)
    fingerprint = _tokenizer(tok_dir).fingerprint if tok_dir.is_dir() else None
    model = load_clip(ckpt, device=device, tokenizer=fingerprint)
    return model, image_transform(model.cfg.vision.img_size)


def create_model_and_transforms(model_name: str | os.PathLike | None = None, pretrained: str | os.PathLike | None = None,
                                device: str | torch.device = "cpu"):
    """``(model, preprocess_train, preprocess_val)`` as open_clip's function of that name.
    ``model_name`` (or ``pretrained``, as open_clip users pass the weights) is a run folder, an
    export folder or a checkpoint file."""
    path = pretrained if pretrained is not None else model_name
    if path is None:
        raise ValueError("create_model_and_transforms needs a run folder, export folder or checkpoint file")
    model, preprocess = load(path, device)
    return model, image_transform(model.cfg.vision.img_size, is_train=True), preprocess


def create_model(model_name: str | os.PathLike, device: str | torch.device = "cpu"):
    """The model alone (eval mode), as ``open_clip.create_model``."""
    return load(model_name, device)[0]


def get_tokenizer(name: str | os.PathLike, context_length: int | None = None):
    """The tokenizer of a run or export (its ``tokenizer/``), encoding to the model's context length
    unless ``context_length`` is given: ``tokenizer(["a dog", "개"])`` -> (B, T) ids for ``encode_text``."""
    ckpt, tok_dir = locate(name)
    meta = read_config(name)
    tok = _tokenizer(tok_dir)
    trained = meta.get("tokenizer")
    if trained and trained != tok.fingerprint:
        raise ValueError(f"{ckpt} was trained with tokenizer {trained}, not the one in {tok_dir} ({tok.fingerprint})")
    tok.context_length = int(context_length or meta["config"]["text"]["context_length"])
    return tok


def _tokenizer(folder: Path):
    from clip.hf_text import load_text_tokenizer

    return load_text_tokenizer(folder)  # ours, or a transformers text tower's own
