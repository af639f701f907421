"""Runtime side of the bilingual (English + Korean) byte-level BPE, following KELIP.

KELIP (Ko et al. 2022, "Large-scale Bilingual Language-Image Contrastive Learning") replaced CLIP's
English-only BPE with one BPE of ~98K tokens trained on English and Korean text, so that Korean
is no longer shredded into UTF-8 bytes. This file holds the pipeline that both training
(``tokenizer/train.py``) and runtime share, and :class:`BilingualTokenizer`, which turns captions
into CLIP-style fixed-length id tensors: ``[SOT] tokens [EOT] [PAD] ...``.

The pipeline is HF ``tokenizers`` (Rust) end to end:
  normaliser  NFC (or NFKC) -> lowercase (optional, KELIP/CLIP default) -> every whitespace run to
              one space -> strip. NFC keeps Hangul syllables *composed* (NFD/jamo input is composed);
              NFKC additionally folds compatibility characters but also maps compatibility jamo
              such as "ㅋ" (U+314B) to conjoining jamo, which is why NFC is the default.
  pre-tokeniser  byte-level (GPT-2 split regex, no prefix space): every string maps to bytes, so
              no input is ever unknown, and merges rebuild whole Hangul syllables from their
              3 UTF-8 bytes; ``decode(encode(x)) == normalize(x)`` exactly.
  post-processor  ``[SOT] $A [EOT]``, so ``tokenizer.json`` alone gives CLIP-style sequences in
              ``tokenizers`` and in ``transformers.PreTrainedTokenizerFast``.

Legend: B batch of captions, T context length (77 by default).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

PAD_TOKEN, SOT_TOKEN, EOT_TOKEN = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
# Ids 0, 1, 2 in this order (the trainer adds special tokens first); clip.model.text.TextConfig's
# defaults (pad_id=0, eot_id=2) rely on it.
SPECIAL_TOKENS = (PAD_TOKEN, SOT_TOKEN, EOT_TOKEN)
CONTEXT_LENGTH = 77
NORMALIZATIONS = ("nfc", "nfkc")
META_FORMAT = "enko-clip/tokenizer/v1"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"


def build_normalizer(normalization: str = "nfc", lowercase: bool = True) -> normalizers.Normalizer:
    """Unicode form first (NFKC can create spaces), then case, then whitespace cleanup."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    steps = [normalizers.NFC() if normalization == "nfc" else normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps)


def build_untrained_tokenizer(normalization: str = "nfc", lowercase: bool = True) -> Tokenizer:
    """The empty byte-level BPE pipeline described in the module docstring."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = build_normalizer(normalization, lowercase)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def add_post_processor(tok: Tokenizer, sot_token: str = SOT_TOKEN, eot_token: str = EOT_TOKEN) -> None:
    """``[SOT] $A [EOT]`` (pairs: ``[SOT] $A [EOT] $B [EOT]``) using the trained ids."""
    sot, eot = tok.token_to_id(sot_token), tok.token_to_id(eot_token)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sot_token} $A {eot_token}",
        pair=f"{sot_token} $A {eot_token} $B:1 {eot_token}:1",
        special_tokens=[(sot_token, sot), (eot_token, eot)],
    )


class BilingualTokenizer:
    """CLIP-style wrapper around a trained ``tokenizers.Tokenizer``.

    Args:
        tokenizer: the trained pipeline (with the ``[SOT] $A [EOT]`` post-processor).
        meta: the contents of ``tokenizer_meta.json`` (special tokens, context length, settings).
    """

    def __init__(self, tokenizer: Tokenizer, meta: dict):
        self._tokenizer = tokenizer
        self.meta = meta
        specials = meta["special_tokens"]
        for name in ("pad", "sot", "eot"):
            token, tid = specials[name]["token"], specials[name]["id"]
            if tokenizer.token_to_id(token) != tid:
                raise ValueError(f"tokenizer_meta.json: {name} token {token!r} is not id {tid} in tokenizer.json")
        self.pad_id, self.sot_id, self.eot_id = (specials[n]["id"] for n in ("pad", "sot", "eot"))
        self.pad_token, self.sot_token, self.eot_token = (specials[n]["token"] for n in ("pad", "sot", "eot"))
        if self.pad_id == self.eot_id:
            raise ValueError("tokenizer_meta.json: pad id must differ from eot id")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.context_length = int(meta.get("context_length", CONTEXT_LENGTH))
        self._fixed: dict[int, Tokenizer] = {}  # context length -> copy with truncation + padding

    @classmethod
    def from_dir(cls, path: str | Path) -> "BilingualTokenizer":
        """Load ``tokenizer.json`` + ``tokenizer_meta.json`` from the folder ``path``."""
        path = Path(path)
        for name in (TOKENIZER_FILE, META_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path / name}")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{path / META_FILE}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
        return cls(Tokenizer.from_file(str(path / TOKENIZER_FILE)), meta)

    @classmethod
    def from_hf(cls, path: str | Path, sot_token: str, eot_token: str, pad_token: str,
                context_length: int = CONTEXT_LENGTH) -> "BilingualTokenizer":
        """Any Hugging Face fast tokenizer (a folder with ``tokenizer.json``, or the file) with the
        start, end and padding tokens named explicitly, e.g. KELIP's (``<s>``, ``</s>``, ``[PAD]``) or
        OpenAI CLIP's (``<|startoftext|>``, ``<|endoftext|>`` and a pad of your choice). Its
        post-processor becomes ``[SOT] $A [EOT]``; normaliser, pre-tokeniser and vocabulary stay.
        :meth:`save` then writes a folder that ``data.tokenizer`` and :meth:`from_dir` read."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file} (save the HF tokenizer with "
                                    "AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
        tok = Tokenizer.from_file(str(file))
        specials = {}
        for name, token in (("pad", pad_token), ("sot", sot_token), ("eot", eot_token)):
            tid = tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"{file}: no token {token!r} for {name.upper()} in the vocabulary")
            specials[name] = {"token": token, "id": tid}
        tok.no_padding()
        tok.no_truncation()
        add_post_processor(tok, sot_token, eot_token)
        meta = {"format": META_FORMAT, "special_tokens": specials, "context_length": int(context_length),
                "source": f"Hugging Face tokenizer {file}"}
        return cls(tok, meta)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_meta.json`` into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path / TOKENIZER_FILE))
        (path / META_FILE).write_text(json.dumps(self.meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the whole pipeline (vocabulary, merges, normalisation,
        special tokens): equal for the same tokenizer wherever it is stored, different for any other."""
        import hashlib

        return hashlib.sha256(self._tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    @property
    def hf_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no padding or truncation configured)."""
        return self._tokenizer

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it; ``decode(encode(text)) == normalize(text)``."""
        norm = self._tokenizer.normalizer
        return norm.normalize_str(text) if norm is not None else text

    def encode(self, text: str) -> list[int]:
        """Content ids of one text, without special tokens, padding or truncation.

        Special-token strings inside ``text`` are encoded as plain text, never as SOT/EOT/PAD.
        """
        return self._raw().encode(text, add_special_tokens=False).ids

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (Rust batch path)."""
        return [e.ids for e in self._raw().encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with SOT, EOT and padding dropped (accepts a list, array or 1-D tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_batch_numpy(self, texts: Sequence[str] | str, context_length: int | None = None) -> np.ndarray:
        """``(B, T)`` int64 array ``[SOT] tokens [EOT] [PAD]...``; long texts are cut so EOT stays last."""
        if isinstance(texts, str):
            texts = [texts]
        T = self.context_length if context_length is None else int(context_length)
        if T < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {T}")
        tok = self._fixed_length(T)
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast path skips offsets
        encodings = encode(list(texts), add_special_tokens=True)
        out = np.full((len(encodings), T), self.pad_id, dtype=np.int64)  # (B, T); padded here, not by
        for row, enc in zip(out, encodings):  # the tokenizer (its padding of every field halves the speed)
            ids = enc.ids
            row[:len(ids)] = ids
        return out

    def encode_batch(self, texts: Sequence[str] | str, context_length: int | None = None):
        """``(B, T)`` ``torch.LongTensor``; see :meth:`encode_batch_numpy`."""
        import torch  # lazily: training and data tooling work without torch

        return torch.from_numpy(self.encode_batch_numpy(texts, context_length))

    __call__ = encode_batch

    def _raw(self) -> Tokenizer:
        if -1 not in self._fixed:
            tok = Tokenizer.from_str(self._tokenizer.to_str())
            tok.encode_special_tokens = True
            self._fixed[-1] = tok
        return self._fixed[-1]

    def _fixed_length(self, T: int) -> Tokenizer:
        if T not in self._fixed:
            tok = Tokenizer.from_str(self._tokenizer.to_str())
            tok.encode_special_tokens = True  # a caption containing "<|endoftext|>" stays text
            tok.enable_truncation(max_length=T)  # counts SOT/EOT, which the post-processor adds after
            self._fixed[T] = tok
        return self._fixed[T]

    def __repr__(self) -> str:
        return (f"BilingualTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"sot_id={self.sot_id}, eot_id={self.eot_id}, pad_id={self.pad_id})")
