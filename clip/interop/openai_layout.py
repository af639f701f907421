"""OpenAI CLIP's state-dict layout, both ways: import OpenAI CLIP / open_clip ``ViT-B-32`` (and
``-quickgelu``) / KELIP weights into :class:`clip.model.CLIP`, and write our weights in that layout
for open_clip's native towers (:mod:`clip.interop.export`).

The layout (Radford et al. 2021; open_clip keeps it): ``visual.conv1`` (patch embedding without
bias), ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre`` (a LayerNorm
before the blocks), ``visual.transformer.resblocks.N`` (``ln_1``, ``attn.in_proj_*`` with q, k, v
stacked, ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), ``visual.ln_post`` on the class
token, ``visual.proj`` (width x embed), and the text tower at the top level: ``token_embedding``,
``positional_embedding``, ``transformer.resblocks.N``, ``ln_final``, ``text_projection``, and
``logit_scale``. Our towers hold the same tensors under timm's names (``blocks.N.norm1``,
``attn.qkv``, ``attn.proj``, ``mlp.fc1`` ...): a rename, two transposes and three reshapes. What the
weights do not say: the number of heads (OpenAI's and open_clip's rule: width / 64) and the
activation (QuickGELU in OpenAI's and KELIP's weights, GELU in open_clip's ``ViT-B-32``).

Legend: D width, E joint embedding width, L patches, T context length.
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from clip.model.clip import CLIPConfig
from clip.model.text import TextConfig
from mae.vit import ViTConfig

# (our name, OpenAI's name) inside one residual block; q, k, v are stacked the same way in both
BLOCK_NAMES = (("norm1.", "ln_1."), ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
               ("attn.proj.", "attn.out_proj."), ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
# whole-key or prefix renames outside the blocks: (ours, OpenAI's)
NAMES = (("visual.patch_embed.proj.weight", "visual.conv1.weight"), ("visual.cls_token", "visual.class_embedding"),
         ("visual.pos_embed", "visual.positional_embedding"), ("visual.norm_pre.", "visual.ln_pre."),
         ("visual.norm.", "visual.ln_post."), ("visual_proj.weight", "visual.proj"),
         ("text.token_embedding.weight", "token_embedding.weight"), ("text.pos_embed", "positional_embedding"),
         ("text.norm.", "ln_final."), ("text_proj.weight", "text_projection"), ("logit_scale", "logit_scale"),
         ("logit_bias", "logit_bias"))
TOWERS = (("visual.blocks.", "visual.transformer.resblocks."), ("text.blocks.", "transformer.resblocks."))
SIGNATURE = ("visual.class_embedding", "visual.conv1.weight", "token_embedding.weight", "text_projection")
DROPPED = ("input_resolution", "context_length", "vocab_size")  # ints stored by OpenAI's TorchScript release
TRANSPOSED = ("visual_proj.weight", "text_proj.weight")  # Linear (E, D) here, a (D, E) matrix there


def _rename(key: str, to_openai: bool) -> str | None:
    src, dst = (0, 1) if to_openai else (1, 0)
    for pair in TOWERS:
        if key.startswith(pair[src]):
            block, rest = key[len(pair[src]):].split(".", 1)
            for names in BLOCK_NAMES:
                if rest.startswith(names[src]):
                    return f"{pair[dst]}{block}.{names[dst]}{rest[len(names[src]):]}"
            return None
    for names in NAMES:
        if key == names[src] or (names[src].endswith(".") and key.startswith(names[src])):
            return names[dst] + key[len(names[src]):]
    return None


def to_openai_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP state dict in OpenAI's layout. The patch-embedding bias of a tower without
    ``pre_norm`` has no slot there; it is added to the patch positions of ``positional_embedding``
    ((x W + b) + p = x W + (p + b): the same sum, rounded in another order)."""
    out, bias = {}, state.get("visual.patch_embed.proj.bias")
    for k, v in state.items():
        if k == "visual.patch_embed.proj.bias":
            continue
        name = _rename(k, to_openai=True)
        if name is None:
            raise ValueError(f"{k}: no counterpart in OpenAI CLIP's layout")
        if k in TRANSPOSED:
            v = v.t()
        elif k == "visual.cls_token":
            v = v.reshape(-1)  # (1, 1, D) -> (D,)
        elif k in ("visual.pos_embed", "text.pos_embed"):
            v = v[0]  # (1, N, D) -> (N, D)
        elif k in ("logit_scale", "logit_bias"):
            v = v.reshape(())
        if k == "visual.pos_embed" and bias is not None:
            v = torch.cat([v[:1], v[1:] + bias], dim=0)  # (1 + L, D): cls position unchanged
        out[name] = v.contiguous()
    return out


def from_openai_layout(state: dict[str, torch.Tensor], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An OpenAI-layout state dict under our names (the inverse of :func:`to_openai_layout` for a
    ``pre_norm`` image tower). Keys with no counterpart are one ValueError naming them."""
    out, unknown = {}, []
    for k, v in state.items():
        if k in DROPPED:
            continue
        name = _rename(k, to_openai=False) if k != "logit_bias" else None  # imports are InfoNCE CLIPs
        if name is None:
            unknown.append(k)
            continue
        if name in TRANSPOSED:
            v = v.t()
        elif name == "visual.cls_token":
            v = v.reshape(1, 1, -1)
        elif name in ("visual.pos_embed", "text.pos_embed"):
            v = v[None]
        elif name == "logit_scale":
            v = v.reshape(1)
        out[name] = v.contiguous()
    if unknown:
        hint = " (a SigLIP / CoCa / HF-text model is not this layout)" if any("logit_bias" in k or "text." in k for k in unknown) else ""
        raise ValueError(f"{where}: {len(unknown)} key(s) outside OpenAI CLIP's layout{hint}: {', '.join(unknown[:8])}")
    return out


def is_openai_layout(state) -> bool:
    """Whether a state dict (or its key list) has OpenAI CLIP's layout."""
    return all(k in state for k in SIGNATURE)


def _depth(state, prefix: str) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"{prefix}: blocks {sorted(blocks)} are not numbered 0..N-1")
    return len(blocks)


def config_from_state(state: dict[str, torch.Tensor], act_layer: str = "quick_gelu", text: TextConfig | None = None,
                      vision_heads: int | None = None, text_heads: int | None = None,
                      where: str = "checkpoint") -> CLIPConfig:
    """The :class:`CLIPConfig` of an OpenAI-layout state dict: sizes from the tensor shapes, ``ln_pre``,
    LayerNorm eps 1e-5, class-token pooling; heads = width / 64 unless given; ``act_layer`` for both
    towers; the text tower's EOT / PAD ids (and other fields) from ``text`` (a tokenizer's)."""
    try:
        conv, pos = state["visual.conv1.weight"], state["visual.positional_embedding"]
        Dv, patch, Dt = conv.shape[0], conv.shape[-1], state["token_embedding.weight"].shape[1]
        grid = round((pos.shape[0] - 1) ** 0.5)
        if grid * grid + 1 != pos.shape[0] or conv.shape[-2] != patch:
            raise ValueError(f"{where}: visual.positional_embedding {tuple(pos.shape)} is not a square grid + 1")
        vdepth, tdepth = _depth(state, "visual.transformer.resblocks."), _depth(state, "transformer.resblocks.")
        vision = ViTConfig(img_size=grid * patch, patch_size=patch, embed_dim=Dv, depth=vdepth,
                           num_heads=vision_heads or max(Dv // 64, 1),
                           mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / Dv,
                           pre_norm=True, norm_eps=1e-5, act_layer=act_layer)
        base = text or TextConfig()
        text_cfg = replace(base, vocab_size=state["token_embedding.weight"].shape[0],
                           context_length=state["positional_embedding"].shape[0], embed_dim=Dt, depth=tdepth,
                           num_heads=text_heads or max(Dt // 64, 1),
                           mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / Dt,
                           act_layer=act_layer, norm_eps=1e-5)
        embed = state["text_projection"].shape[1]
    except KeyError as e:
        raise ValueError(f"{where}: missing {e.args[0]} (not OpenAI CLIP's layout)") from None
    if state["visual.proj"].shape[1] != embed:
        raise ValueError(f"{where}: visual.proj {tuple(state['visual.proj'].shape)} and text_projection "
                         f"{tuple(state['text_projection'].shape)} disagree on the joint width")
    return CLIPConfig(vision=vision, text=text_cfg, embed_dim=embed, vision_pool="token")


def init_from_openai(model: CLIPConfig, raw: dict[str, torch.Tensor],
                     where: str) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """For ``--init`` (:mod:`clip.interop.init`): ``(model config, state dict under our names)`` of an
    OpenAI-layout state dict: ``model`` with the checkpoint's sizes, ``ln_pre``, eps 1e-5 and
    class-token pooling; the activations and the tokenizer's vocabulary and ids stay ``model``'s
    (the weights do not record the activation). Every problem is one ValueError naming ``where``."""
    found = config_from_state(raw, model.text.act_layer, model.text, where=where)
    if found.text.vocab_size != model.text.vocab_size:
        raise ValueError(f"{where}: token_embedding has {found.text.vocab_size} rows but the tokenizer has "
                         f"{model.text.vocab_size} tokens: use the checkpoint's own tokenizer (python -m tokenizer.hf_import)")
    cfg = replace(model, vision=replace(found.vision, act_layer=model.vision.act_layer), text=found.text,
                  embed_dim=found.embed_dim, vision_pool="token")
    return cfg, from_openai_layout(raw, where)
