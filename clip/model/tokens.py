"""The tokenizer of a CLIP text tower: loaded, checked and sized in one place.

A text tower reads ids from one tokenizer: ours (:class:`tokenizer.BilingualTokenizer`, a folder
with ``tokenizer_meta.json``) or, for ``model.text_tower: hf``, the transformers encoder's own,
behind the same interface (:class:`HFTokenizer`: ``encode_batch`` -> (B, T) ids padded on the
right, ``pad_id`` / ``sot_id`` / ``eot_id``, ``vocab_size``, ``fingerprint``, ``normalize``,
``save``). The model decides the context length (``TextConfig.context_length``, written into
every saved model config); :func:`load_text_tokenizer` is given it, so every tokenizer in use
encodes to the model's T. :func:`text_config_for` is the other direction: the vocabulary size and
special ids come from the tokenizer, never from a config. A tokenizer file that cannot be read,
a tokenizer that does not fit a model, and one that maps most captions to its unknown token are
each one ValueError line.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from clip.model.text import TextConfig
from tokenizer.bpe import CONTEXT_LENGTH


class HFTokenizer:
    """A ``transformers`` tokenizer with :class:`tokenizer.BilingualTokenizer`'s interface.

    Args:
        tokenizer: a ``PreTrainedTokenizer(Fast)`` with a padding token.
        context_length: default T of :meth:`encode_batch`.
    """

    def __init__(self, tokenizer, context_length: int = CONTEXT_LENGTH):
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
        self.unk_id = tokenizer.unk_token_id  # None when it has none
        self.context_length = context_length

    @classmethod
    def from_dir(cls, path: str | os.PathLike, context_length: int = CONTEXT_LENGTH) -> "HFTokenizer":
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
    """Our tokenizer (a folder with ``tokenizer_meta.json``) or a transformers one (any other folder
    with ``tokenizer.json`` / ``tokenizer_config.json``), encoding to ``context_length`` when given.
    FileNotFoundError when the folder holds none; ValueError (one line naming it) when its files
    cannot be read."""
    from tokenizer import BilingualTokenizer
    from tokenizer.bpe import META_FILE

    folder = Path(path)
    try:
        if (folder / META_FILE).is_file():
            tok = BilingualTokenizer.from_dir(folder)
        else:
            tok = HFTokenizer.from_dir(folder)
    except FileNotFoundError:
        raise
    except Exception as e:  # tokenizers / transformers raise bare Exceptions for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{folder}: not a readable tokenizer ({first}); copy it again from its source") from None
    if context_length is not None:
        tok.context_length = int(context_length)
    return tok


def text_config_for(cfg: TextConfig, tokenizer) -> TextConfig:
    """``cfg`` with the vocabulary size and the EOT / PAD ids of ``tokenizer``: the tokenizer, not
    the config, decides them."""
    return replace(cfg, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)


def check_tokenizer(tokenizer, text: TextConfig, where: str) -> None:
    """ValueError (one line) unless ``tokenizer`` has the vocabulary size and EOT / PAD ids of ``text``."""
    have = (tokenizer.vocab_size, tokenizer.eot_id, tokenizer.pad_id)
    want = (text.vocab_size, text.eot_id, text.pad_id)
    if have != want:
        raise ValueError(f"tokenizer {where} ({have[0]} tokens, eot id {have[1]}, pad id {have[2]}) is not the "
                         f"model's ({want[0]} tokens, eot id {want[1]}, pad id {want[2]})")


def unknown_share(tokenizer, texts) -> float:
    """The share of ``texts`` whose content tokens are mostly (more than half) the tokenizer's unknown
    token: 0 for tokenizers without one (ours is byte-level: nothing is unknown)."""
    unk = getattr(tokenizer, "unk_id", None)
    if unk is None or not texts:
        return 0.0
    ids = tokenizer.encode_batch(list(texts))  # (N, T)
    special = (ids == tokenizer.pad_id) | (ids == tokenizer.sot_id) | (ids == tokenizer.eot_id)
    content = (~special).sum(dim=1).clamp(min=1)
    return float((((ids == unk) & ~special).sum(dim=1) * 2 > content).double().mean())
