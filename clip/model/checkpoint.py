"""``clip_ckpt.pt``, the trained model of stage 2: one writer, one reader, one way to find it.

The file (:mod:`mae.common.files` format ``enko-clip/clip/v1``) holds the ``CLIPConfig`` (image
normalisation included), the weights (``torch.load(weights_only=True)``), the fingerprint of the
tokenizer it was trained with, the caption languages it was trained on and, for a transformers
text tower, that encoder's ``config.json`` as a string (``hf_text_config``), so it loads without
the encoder's folder (``AutoModel.from_config``: never remote code, never a pickle). The same
content can be a safetensors folder (``config.json`` + ``model.safetensors``). A path is found by
:func:`locate`: a run folder holding ``clip_ckpt.pt``, an export folder, or the file itself, with
the run's ``tokenizer/`` beside it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from clip.model.clip import CLIP, CLIPConfig
from clip.model.hf_text import HFTextTower, tower_from_config_json
from mae.common.configs import ConfigError, build
from mae.common.files import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, register_format, save_checkpoint, save_pretrained

CLIP_FORMAT = register_format("enko-clip/clip/v1", "a CLIP checkpoint (clip_ckpt.pt)")
CKPT_FILE = "clip_ckpt.pt"
TOKENIZER_DIR = "tokenizer"
_LEGACY_POOLS = {"mean": "avg", "first": "token"}  # hf_text.pool as written before the names were unified


def locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint, tokenizer folder)`` of a run folder, an export folder or a checkpoint file.
    FileNotFoundError (one line) when there is no CLIP checkpoint at ``path``."""
    p = Path(path)
    if p.is_dir():
        if (p / CKPT_FILE).is_file():
            return p / CKPT_FILE, p / TOKENIZER_DIR
        if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file():
            return p, p / TOKENIZER_DIR
        raise FileNotFoundError(f"no CLIP checkpoint in {p}: expected {CKPT_FILE}, or {CONFIG_FILE} + {WEIGHTS_FILE}")
    if p.is_file():
        return p, p.parent / TOKENIZER_DIR
    raise FileNotFoundError(f"CLIP checkpoint not found: {p}")


def _extra(model: CLIP, tokenizer: str | None, languages) -> dict:
    extra = {"tokenizer": tokenizer} if tokenizer else {}
    if languages is not None:
        extra["languages"] = [str(lang) for lang in languages]
    if isinstance(model.text, HFTextTower):
        extra["hf_text_config"] = model.text.config_json()
    return extra


def save_clip(model: CLIP, path, tokenizer: str | None = None, languages=None, state_dict=None) -> None:
    """Write ``clip_ckpt.pt`` (atomically). ``tokenizer``: its fingerprint; ``languages``: the
    caption languages of training; ``state_dict``: other weights of the same model (e.g. its EMA)."""
    save_checkpoint(path, CLIP_FORMAT, asdict(model.cfg), state_dict or model.state_dict(),
                    extra=_extra(model, tokenizer, languages) or None)


def save_clip_pretrained(model: CLIP, folder, tokenizer=None, languages=None, state_dict=None) -> Path:
    """The safetensors folder: ``model.safetensors`` + ``config.json`` (+ ``tokenizer/`` when given
    the tokenizer object), what :func:`load_clip` and ``clip.load`` read."""
    folder = Path(folder)
    save_pretrained(folder, CLIP_FORMAT, asdict(model.cfg), state_dict or model.state_dict(),
                    _extra(model, tokenizer.fingerprint if tokenizer is not None else None, languages) or None)
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER_DIR)
    return folder


def config_from_dict(d: dict, where: str = "checkpoint") -> CLIPConfig:
    """The :class:`CLIPConfig` of a saved config dict (older spellings upgraded); ValueError naming ``where``."""
    d = dict(d)
    hf = d.get("hf_text")
    if isinstance(hf, dict) and hf.get("pool") in _LEGACY_POOLS:
        d["hf_text"] = {**hf, "pool": _LEGACY_POOLS[hf["pool"]]}
    try:
        return build(CLIPConfig, d, f"{where} key 'config'")
    except ConfigError as e:
        raise ValueError(f"{where}: the saved config is not a CLIPConfig: {e}") from None


def read_meta(path: str | os.PathLike) -> dict:
    """What a checkpoint says beside its weights (``config``, ``tokenizer``, ``languages``), read
    without keeping the tensors."""
    ckpt, _ = locate(path)
    if ckpt.is_dir() or ckpt.suffix == ".safetensors":
        folder = ckpt if ckpt.is_dir() else ckpt.parent
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    return {k: v for k, v in load_checkpoint(ckpt, CLIP_FORMAT).items() if k != "model"}


def load_clip(path, device="cpu", tokenizer: str | None = None) -> CLIP:
    """Rebuild a :class:`CLIP` from ``clip_ckpt.pt`` or a safetensors folder (weights only); returned
    in eval mode. With ``tokenizer`` (a fingerprint), a checkpoint trained with another tokenizer
    is a ValueError."""
    path = os.fspath(path)
    ckpt = load_checkpoint(path, CLIP_FORMAT)
    trained = ckpt.get("tokenizer")
    if tokenizer and trained and trained != tokenizer:
        raise ValueError(f"{path} was trained with tokenizer {trained}, not this one ({tokenizer}): use the "
                         "tokenizer/ folder of its run")
    cfg = config_from_dict(ckpt["config"], path)
    text = None
    if cfg.text_tower == "hf":
        if not isinstance(ckpt.get("hf_text_config"), str):
            raise ValueError(f"{path}: text_tower 'hf' but no 'hf_text_config' (the encoder's config.json) saved")
        text = tower_from_config_json(ckpt["hf_text_config"], cfg.hf_text.pool, cfg.text.pad_id)
    model = CLIP(cfg, text_tower=text)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:  # missing / unexpected keys or shapes, all listed by torch
        raise ValueError(f"{path}: weights do not match the saved config: {' '.join(str(e).split())}") from None
    langs = ckpt.get("languages")
    model.trained_languages = list(langs) if isinstance(langs, list) else None
    return model.to(device).eval()


def load_clip_and_tokenizer(path, tokenizer_dir=None, device="cpu", require_tokenizer: bool = True):
    """``(model, tokenizer)`` of a run folder, an export folder or a checkpoint file: the tokenizer
    (default: the ``tokenizer/`` beside the checkpoint; ours or a transformers text tower's own) at
    the model's context length, checked against the fingerprint the model was trained with and
    against its vocabulary and special ids. Without a tokenizer folder and with
    ``require_tokenizer=False`` the tokenizer is None. FileNotFoundError / ValueError in one line."""
    from clip.model.tokens import check_tokenizer, load_text_tokenizer

    ckpt, default_dir = locate(path)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_dir
    if not tok_dir.is_dir() and not require_tokenizer:
        return load_clip(ckpt, device), None
    meta = read_meta(ckpt)
    context = config_from_dict(meta["config"], str(ckpt)).text.context_length
    try:
        tokenizer = load_text_tokenizer(tok_dir, context)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (pass --tokenizer DIR)") from None
    model = load_clip(ckpt, device, tokenizer=tokenizer.fingerprint)
    check_tokenizer(tokenizer, model.cfg.text, str(tok_dir))
    return model, tokenizer
