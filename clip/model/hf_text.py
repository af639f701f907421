"""A Hugging Face text encoder as CLIP's text tower, and its tokenizer behind our tokenizer's interface.

Parallel Multilingual CLIP (Krasner & Lanuzo) and M-CLIP (Carlsson et al. 2022) put a pretrained
multilingual encoder (XLM-R, mBERT) under an added linear projection and pool its last hidden
states by the mean over the non-padding tokens (``pool: avg``) or take the first token
(``pool: token``, BERT's [CLS] / XLM-R's <s>), the image tower's pooling names. The encoder is
``transformers.AutoModel`` read from a local folder (nothing is downloaded); its tokenizer is
:class:`clip.model.tokens.HFTokenizer`.

A saved CLIP keeps the encoder's ``config.json`` (as a JSON string) next to its weights in
``clip_ckpt.pt``: :func:`tower_from_config_json` rebuilds the tower without the original folder
(``AutoModel.from_config``, never remote code, never a pickle).

Legend: B batch, T tokens, D encoder width.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

HFPool = Literal["avg", "token"]  # the mean over non-padding tokens, or the first token


@dataclass(frozen=True)
class HFTextConfig:
    """The transformers encoder of ``model.text_tower: hf``.

    ``path``: a local folder holding ``config.json``, the weights and the tokenizer files (as
    ``save_pretrained`` writes them); read when training starts, not when a checkpoint is loaded.
    ``pool``: ``avg``, the mean over the non-padding tokens (M-CLIP), or ``token``, the first token.
    """

    path: str = ""
    pool: HFPool = "avg"

    def __post_init__(self):
        if self.pool not in get_args(HFPool):
            raise ValueError(f"hf_text.pool must be one of {get_args(HFPool)}, got {self.pool!r}")


def _check_folder(path: str) -> Path:
    p = Path(path)
    if not path or not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.hf_text.path={path!r}: not a local transformers model folder "
                                "(no config.json); save one with save_pretrained(FOLDER)")
    return p


def _without_pooler(build, *args, **kw):
    """BERT-family models add a pooler that CLIP never uses (no gradient would reach it): leave it out."""
    try:
        return build(*args, add_pooling_layer=False, **kw)
    except TypeError:  # models without that switch
        return build(*args, **kw)


class HFTextTower(nn.Module):
    """A transformers encoder pooled to one vector per text: ids (B, T) -> (B, D).

    Args:
        encoder: a ``transformers`` model whose output has ``last_hidden_state`` (B, T, D).
        pool: ``avg`` over non-padding tokens or the first ``token``.
        pad_id: the padding id; positions holding it are masked out of attention and the mean.
    """

    def __init__(self, encoder: nn.Module, pool: HFPool = "avg", pad_id: int = 0):
        super().__init__()
        if pool not in get_args(HFPool):
            raise ValueError(f"pool must be one of {get_args(HFPool)}, got {pool!r}")
        self.model, self.pool, self.pad_id = encoder, pool, int(pad_id)
        self.embed_dim = int(encoder.config.hidden_size)
        self.depth = int(getattr(encoder.config, "num_hidden_layers", 0))

    def config_json(self) -> str:
        """The encoder's ``config.json`` as a string (what :func:`tower_from_config_json` reads)."""
        return self.model.config.to_json_string(use_diff=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable and getattr(self.model, "supports_gradient_checkpointing", False):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif getattr(self.model, "is_gradient_checkpointing", False):
            self.model.gradient_checkpointing_disable()

    def blank_like(self, row: torch.Tensor) -> torch.Tensor:
        """The row a masked caption slot is run as: all padding (its output is multiplied by 0)."""
        return torch.full_like(row, self.pad_id)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be (B, T), got shape {tuple(tokens.shape)}")
        mask = tokens != self.pad_id  # (B, T)
        mask[:, 0] = True  # the first token (<s> / [CLS]) always attends, so an all-pad row has no empty softmax
        # padding is on the right: columns after the longest row change nothing (bidirectional
        # attention with those keys masked), so they are cut
        T = int(mask.any(dim=0).nonzero().max()) + 1
        tokens, mask = tokens[:, :T], mask[:, :T]
        h = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state  # (B, T, D)
        if self.pool == "token":
            return h[:, 0]
        m = mask[..., None].to(h.dtype)  # (B, T, 1)
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # (B, D)


def tower_from_pretrained(cfg: HFTextConfig, pad_id: int) -> HFTextTower:
    """The pretrained encoder in ``cfg.path`` (local files only) as a tower."""
    from transformers import AutoModel

    folder = _check_folder(cfg.path)
    encoder = _without_pooler(AutoModel.from_pretrained, str(folder), local_files_only=True)
    return HFTextTower(encoder, cfg.pool, pad_id)


def tower_from_config_json(config_json: str, pool: HFPool, pad_id: int) -> HFTextTower:
    """An untrained tower of the architecture in ``config_json`` (weights come from the checkpoint)."""
    from transformers import AutoConfig, AutoModel

    d = json.loads(config_json)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("the saved text-tower config has no model_type")
    config = AutoConfig.for_model(model_type, **d)
    return HFTextTower(_without_pooler(AutoModel.from_config, config), pool, pad_id)
