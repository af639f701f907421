"""Tiny random Hugging Face models built offline for the tests: an XLM-R-style encoder and a
Marian translation model, each saved with its tokenizer into a folder (``save_pretrained``)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus_lines(n: int = 400) -> list[str]:
    """English and Korean lines of the bundled corpus and emoji captions (what the tests caption with)."""
    lines = []
    for row in (ROOT / "data" / "emoji" / "captions.jsonl").read_text(encoding="utf-8").splitlines()[:n]:
        r = json.loads(row)
        lines += [r["en"], r["ko"]]
    for name in ("en.txt", "ko.txt"):
        lines += (ROOT / "data" / "corpus" / name).read_text(encoding="utf-8").splitlines()[:n]
    return lines


def save_tiny_xlmr(folder: Path, hidden: int = 32, layers: int = 2, vocab_size: int = 600, seed: int = 0) -> Path:
    """A random ``XLMRobertaModel`` (dropout off) and a byte-level BPE tokenizer with XLM-R's special
    tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2), written to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_lines(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    torch.manual_seed(seed)
    cfg = XLMRobertaConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    XLMRobertaModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def save_tiny_marian(folder: Path, targets=("es", "ja", "hi"), seed: int = 0) -> Path:
    """A random multi-target ``MarianMTModel`` whose vocabulary holds ``>>xx<<`` tokens for
    ``targets``, with a ``MarianTokenizer`` over a small SentencePiece model trained here."""
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus_lines(200)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=400,
                                   character_coverage=0.98, model_type="unigram", minloglevel=2)
    text.unlink()
    proc = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    pieces = [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    vocab = {}
    for tok in ["</s>", "<unk>", *[f">>{t}<<" for t in targets], *pieces, "<pad>"]:
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tok = MarianTokenizer(str(folder / "sp.model"), str(folder / "sp.model"), str(folder / "vocab.json"),
                          source_lang="en", target_lang="mul")
    for name in ("vocab.json", "sp.model", "sp.vocab"):
        (folder / name).unlink()
    torch.manual_seed(seed)
    pad = vocab["<pad>"]
    cfg = MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                       pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=vocab["</s>"],
                       forced_eos_token_id=vocab["</s>"])
    model = MarianMTModel(cfg)
    model.generation_config.bad_words_ids = [[pad]]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
