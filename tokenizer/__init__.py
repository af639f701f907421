"""Bilingual English + Korean byte-level BPE (KELIP-style): training in ``tokenizer.train``,
runtime in :class:`BilingualTokenizer`."""
from tokenizer.bpe import (
    CONTEXT_LENGTH,
    EOT_TOKEN,
    PAD_TOKEN,
    SOT_TOKEN,
    SPECIAL_TOKENS,
    BilingualTokenizer,
)

__all__ = ["BilingualTokenizer", "CONTEXT_LENGTH", "SPECIAL_TOKENS", "PAD_TOKEN", "SOT_TOKEN", "EOT_TOKEN"]
