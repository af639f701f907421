"""Export a trained model for other tools:

    python -m clip.export --checkpoint runs/clip --format open_clip --out exported/enko-clip
    python -m clip.export --checkpoint runs/clip --format safetensors --out exported/clip
    python -m clip.export --checkpoint runs/mae/mae_ckpt.pt --format safetensors --out exported/mae

``open_clip``: a folder that ``open_clip`` 3.x loads with no code of ours:
``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``
(also CLIP_benchmark's ``--model local-dir:DIR``), or by name after
``open_clip.add_model_config("DIR/NAME.json")``: ``create_model_and_transforms(NAME,
pretrained="DIR/open_clip_model.safetensors")``. It holds ``open_clip_config.json`` (model and
preprocess config), ``NAME.json`` (the model config alone), ``open_clip_model.safetensors`` and the
tokenizer as a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``, read through
``transformers.AutoTokenizer``; special ids, padding and truncation as ours).

How the towers map (checked to 1e-5 by tests/test_export.py): the text tower is open_clip's own
``TextTransformer`` (pre-LN blocks, causal mask, ``pool_type: eos`` at our EOT id, LayerNorm eps
1e-5, GELU or QuickGELU, a bias-free projection). The image tower is, when a timm model of that
name has exactly its architecture (``vit_base_patch32_224`` for our ViT-B/32), open_clip's timm
tower (``timm_model_name``, ``timm_pool`` avg or token, ``timm_proj: linear`` without bias) with our
weights unchanged; otherwise open_clip's native ViT (``no_ln_pre`` unless ours has ``pre_norm``,
``pool_type`` avg / tok, LayerNorm eps in ``norm_kwargs``), whose patch embedding has no bias: ours is
added to the patch positions of ``positional_embedding``, the same sum at the model's image size
(open_clip interpolates position embeddings for other sizes, where the folded bias is interpolated
with them). The two towers must share one activation (open_clip's ``quick_gelu`` is per model).

``safetensors``: ``model.safetensors`` + ``config.json`` (+ ``tokenizer/`` for CLIP), the folder
``clip.load``, ``python -m clip.eval --checkpoint`` and ``--init`` (MAE) read; the MAE encoder's
weights keep timm's names.

Bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# timm ViT sizes by (width, depth, heads): the names tried for open_clip's timm tower
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large"}


def timm_name_for(cfg) -> str | None:
    """The name of a timm model whose architecture is exactly this ``ViTConfig`` (same tensors,
    LayerNorm eps, activation, pre-norm), or None."""
    import timm

    from mae.vit import VisionTransformer

    size = TIMM_SIZES.get((cfg.embed_dim, cfg.depth, cfg.num_heads))
    name = f"vit_{size}_patch{cfg.patch_size}_{cfg.img_size}"
    if size is None or not timm.is_model(name):
        return None
    with torch.device("meta"):
        ref, ours = timm.create_model(name, pretrained=False, num_classes=0), VisionTransformer(cfg)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    same = (shapes(ref) == shapes(ours) and ref.norm.eps == ours.norm.eps
            and type(ref.blocks[0].mlp.act) is type(ours.blocks[0].mlp.act)
            and type(ref.norm_pre) is type(ours.norm_pre) and ref.has_class_token)
    return name if same else None


def open_clip_model(model, tokenizer_dir: str = "", vision: str = "auto") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(open_clip model config, state dict in open_clip's layout)`` of our CLIP.

    Args:
        tokenizer_dir: written as ``text_cfg.hf_tokenizer_name`` (open_clip's ``local-dir:`` reads
            the model's own folder instead).
        vision: ``timm`` (open_clip's timm tower; ValueError if no timm model fits), ``native``
            (open_clip's ViT) or ``auto`` (timm when one fits).
    """
    from clip.interop.openai_layout import to_openai_layout

    cfg, v, t = model.cfg, model.cfg.vision, model.cfg.text
    if v.act_layer != t.act_layer:
        raise ValueError(f"open_clip has one activation for both towers; the image tower uses {v.act_layer}, "
                         f"the text tower {t.act_layer}")
    if v.embed_dim % v.num_heads or t.embed_dim % t.num_heads:
        raise ValueError("open_clip needs the tower widths divisible by their head counts")
    timm_name = timm_name_for(v) if vision in ("auto", "timm") else None
    if vision == "timm" and timm_name is None:
        raise ValueError(f"no timm model has the image tower's architecture ({v}); use --vision native")
    state = {k: v_.detach().cpu() for k, v_ in model.state_dict().items()}
    text_cfg = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.embed_dim,
                "heads": t.num_heads, "layers": t.depth, "mlp_ratio": t.mlp_ratio, "pool_type": "eos",
                "eos_id": t.eot_id, "pad_id": t.pad_id, "norm_kwargs": {"eps": t.norm_eps},
                "hf_tokenizer_name": str(tokenizer_dir), "tokenizer_kwargs": {"clean": "whitespace"}}
    if timm_name:
        vision_cfg = {"timm_model_name": timm_name, "timm_model_pretrained": False,
                      "timm_pool": "avg" if cfg.vision_pool == "avg" else "token", "timm_proj": "linear",
                      "timm_proj_bias": False, "image_size": v.img_size}
        visual = {f"visual.trunk.{k[len('visual.'):]}": x for k, x in state.items() if k.startswith("visual.")}
        visual["visual.head.proj.weight"] = state["visual_proj.weight"]
        rest = to_openai_layout({k: x for k, x in state.items() if not k.startswith("visual")})
        out = {**visual, **rest}
    else:
        vision_cfg = {"image_size": v.img_size, "patch_size": v.patch_size, "width": v.embed_dim, "layers": v.depth,
                      "head_width": v.embed_dim // v.num_heads, "mlp_ratio": v.mlp_ratio, "no_ln_pre": not v.pre_norm,
                      "pool_type": "avg" if cfg.vision_pool == "avg" else "tok", "norm_kwargs": {"eps": v.norm_eps}}
        out = to_openai_layout(state)
    model_cfg = {"embed_dim": cfg.embed_dim, "quick_gelu": v.act_layer == "quick_gelu",
                 "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if cfg.loss == "siglip":  # open_clip builds the logit_bias parameter from this; its value is in the weights
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg, out


def write_hf_tokenizer(tokenizer, out: Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` that
    ``transformers.AutoTokenizer`` loads as a fast tokenizer with our SOT / EOT / PAD."""
    from mae.common.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tokenizer.hf_tokenizer.to_str(pretty=True))
    special = {"bos_token": tokenizer.sot_token, "eos_token": tokenizer.eot_token, "pad_token": tokenizer.pad_token}
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tokenizer.context_length,
            "padding_side": "right", "truncation_side": "right", "clean_up_tokenization_spaces": False, **special}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def export_open_clip(model, tokenizer, out: str | os.PathLike, name: str = "enko-clip", vision: str = "auto") -> Path:
    """Write the open_clip folder described in the module docstring; returns it."""
    from safetensors.torch import save

    from mae.common.files import atomic_write_bytes, atomic_write_text

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_cfg, state = open_clip_model(model, str(out), vision)
    write_hf_tokenizer(tokenizer, out)
    atomic_write_bytes(out / OPEN_CLIP_WEIGHTS, save(state, metadata={"format": "pt"}))
    preprocess = {"mean": list(model.cfg.image_mean), "std": list(model.cfg.image_std), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    atomic_write_text(out / f"{name}.json", json.dumps(model_cfg, indent=2) + "\n")
    atomic_write_text(out / OPEN_CLIP_CONFIG, json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                         indent=2) + "\n")
    return out


def export(checkpoint: str, fmt: str, out: str, tokenizer_dir: str | None = None, name: str = "enko-clip",
           vision: str = "auto") -> Path:
    """Export an MAE encoder or a CLIP checkpoint (file, run folder or safetensors folder)."""
    from clip.model.checkpoint import load_clip_and_tokenizer, locate, save_clip_pretrained
    from mae.checkpoint import MAE_FORMAT, load_encoder_checkpoint
    from mae.common.files import peek_format, save_pretrained

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if peek_format(path) == MAE_FORMAT:
        if fmt != "safetensors":
            raise ValueError(f"{path} is an MAE encoder: only --format safetensors applies to it")
        cfg, state = load_encoder_checkpoint(path)
        save_pretrained(out, MAE_FORMAT, asdict(cfg), state)
        return Path(out)
    locate(path)  # one line when there is no CLIP checkpoint there
    model, tokenizer = load_clip_and_tokenizer(path, tokenizer_dir)
    if fmt == "open_clip":
        return export_open_clip(model, tokenizer, out, name, vision)
    return save_clip_pretrained(model, out, tokenizer, model.trained_languages)
