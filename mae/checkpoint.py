"""``mae_ckpt.pt``, the file stage 1 hands to stage 2: the encoder's :class:`mae.vit.ViTConfig`, its
weights under timm's names (decoder and mask token left out: ``timm.create_model(
"vit_base_patch32_224")`` loads them unchanged) and the pixel normalisation it was trained with.
One writer, one reader; loaded with ``torch.load(weights_only=True)``, or from the safetensors
folder ``python -m clip.export --format safetensors`` writes."""
from __future__ import annotations

import dataclasses
import os

import torch

from mae.common.configs import ConfigError, build
from mae.common.files import load_checkpoint, register_format, save_checkpoint
from mae.vit import ViTConfig

MAE_FORMAT = register_format("enko-clip/mae-encoder/v1", "an MAE encoder export (mae_ckpt.pt)")


def save_encoder_checkpoint(model, path: str | os.PathLike, mean=None, std=None) -> None:
    """Write ``mae_ckpt.pt`` (atomically) from a :class:`mae.model.MaskedAutoencoder`; ``mean`` /
    ``std``: the normalisation of its training pixels (recorded as ``preprocess``)."""
    extra = {"preprocess": {"mean": list(mean), "std": list(std)}} if mean is not None else None
    save_checkpoint(path, MAE_FORMAT, dataclasses.asdict(model.cfg.encoder), model.encoder.state_dict(), extra)


def load_encoder_checkpoint(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """``(ViTConfig, encoder state dict)`` of an MAE export (file or safetensors folder).

    Raises FileNotFoundError if it is missing and ValueError (one line naming the file) if it is
    not a weights-only MAE encoder export or its config is not a ``ViTConfig``.
    """
    ckpt = load_checkpoint(path, MAE_FORMAT)
    try:
        cfg = build(ViTConfig, ckpt["config"], f"{os.fspath(path)} key 'config'")
    except ConfigError as e:
        raise ValueError(f"{os.fspath(path)}: key 'config' is not a ViTConfig ({e})") from None
    return cfg, ckpt["model"]
