"""A Hugging Face text encoder as CLIP's text tower, and its tokenizer behind our tokenizer's interface.

Parallel Multilingual CLIP (Krasner & Lanuzo) and M-CLIP (Carlsson et al. 2022) put a pretrained
multilingual encoder (XLM-R, mBERT) under an added linear projection and pool its last hidden
states by the mean over the non-padding tokens (``pool: mean``) or take the first token
(``pool: first``, BERT's [CLS] / XLM-R's <s>). The encoder is ``transformers.AutoModel`` read from
a local folder (nothing is downloaded), its tokenizer ``AutoTokenizer`` from the same folder.

:class:`HFTokenizer` gives a ``transformers`` tokenizer the interface the collate and the
evaluation use for :class:`tokenizer.BilingualTokenizer` (``encode_batch`` -> (B, T) ids padded on
the right, ``pad_id`` / ``sot_id`` / ``eot_id``, ``vocab_size``, ``fingerprint``, ``normalize``,
``save``), so captions are tokenized with the encoder's own tokenizer.

A saved CLIP keeps the encoder's ``config.json`` (as a JSON string) next to its weights in
``clip_ckpt.pt``: :func:`tower_from_config_json` rebuilds the tower without the original folder
(``AutoModel.from_config``, never remote code, never a pickle).

Legend: B batch, T tokens, D encoder width.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

HFPool = Literal["mean", "first"]
TextTower = Literal["gpt2", "hf"]  # our GPT-2-style tower (clip.text) or a transformers encoder


@dataclass(frozen=True)
class HFTextConfig:
    """The transformers encoder of ``model.text_tower: hf``.

    ``path``: a local folder holding ``config.json``, the weights and the tokenizer files (as
    ``save_pretrained`` writes them); read when training starts, not when a checkpoint is loaded.
    ``pool``: ``mean`` over the non-padding tokens (M-CLIP) or the ``first`` token.
    """

    path: str = ""
    pool: HFPool = "mean"

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
        pool: ``mean`` over non-padding tokens or ``first`` token.
        pad_id: the padding id; positions holding it are masked out of attention and the mean.
    """

    def __init__(self, encoder: nn.Module, pool: HFPool = "mean", pad_id: int = 0):
        super().__init__()
        if pool not in get_args(HFPool):
            raise ValueError(f"pool must be one of {get_args(HFPool)}, got {pool!r}")
        self.model, self.pool, self.pad_id = encoder, pool, int(pad_id)
        self.embed_dim = int(encoder.config.hidden_size)

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
        if self.pool == "first":
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


class HFTokenizer:
    """A ``transformers`` tokenizer with :class:`tokenizer.BilingualTokenizer`'s interface.

    Args:
        tokenizer: a ``PreTrainedTokenizer(Fast)`` with a padding token.
        context_length: default T of :meth:`encode_batch`.
    """

    def __init__(self, tokenizer, context_length: int = 77):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no padding token")
        tokenizer.padding_side = "right"  # HFTextTower cuts trailing padding columns
        self.tok = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.sot_id = int(first if first is not None else self.pad_id)
        self.eot_id = int(last if last is not None else self.pad_id)
        self.vocab_size = len(tokenizer)
        self.context_length = context_length

    @classmethod
    def from_dir(cls, path: str | os.PathLike, context_length: int = 77) -> "HFTokenizer":
        """``AutoTokenizer`` from a local folder (FileNotFoundError if it holds none)."""
        from transformers import AutoTokenizer

        p = Path(path)
        if not p.is_dir() or not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(f"no transformers tokenizer in {p} (tokenizer.json / tokenizer_config.json)")
        return cls(AutoTokenizer.from_pretrained(str(p), local_files_only=True), context_length)

    def save(self, path: str | os.PathLike) -> None:
        self.tok.save_pretrained(str(path))

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the tokenizer's pipeline (fast tokenizers) or vocabulary."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:  # without the padding / truncation state each call leaves behind
            d = json.loads(backend.to_str())
            d.pop("padding", None), d.pop("truncation", None)
            text = json.dumps(d, sort_keys=True)
        else:
            text = json.dumps(self.tok.get_vocab(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def normalize(self, text: str) -> str:
        backend = getattr(self.tok, "backend_tokenizer", None)
        norm = getattr(backend, "normalizer", None) if backend is not None else None
        return norm.normalize_str(text) if norm is not None else text

    def encode_batch(self, texts, context_length: int | None = None) -> torch.Tensor:
        """(B, T) long ids, the tokenizer's special tokens added, truncated and right-padded to T."""
        if isinstance(texts, str):
            texts = [texts]
        T = self.context_length if context_length is None else int(context_length)
        enc = self.tok(list(texts), padding="max_length", truncation=True, max_length=T, return_tensors="pt")
        return enc["input_ids"].long()

    __call__ = encode_batch


def load_text_tokenizer(path: str | os.PathLike, context_length: int | None = None):
    """Our tokenizer (a folder with ``tokenizer_meta.json``) or a transformers one (anything else)."""
    from tokenizer import BilingualTokenizer
    from tokenizer.bpe import META_FILE

    if (Path(path) / META_FILE).is_file():
        return BilingualTokenizer.from_dir(path)
    return HFTokenizer.from_dir(path, context_length or 77)
