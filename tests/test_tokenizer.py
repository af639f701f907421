"""Bilingual BPE: trained on the bundled corpus slice inside the tests, then round-tripped and checked."""
from __future__ import annotations

import json
import subprocess
import sys
import unicodedata

import pytest

from tokenizer import CONTEXT_LENGTH, EOT_TOKEN, BilingualTokenizer
from tokenizer.train import MIN_VOCAB_SIZE, guess_language, main, sample_corpus, train_tokenizer

TEXTS = {
    "english": "A photo of a Cat sitting on the Mat, isn't it?",
    "korean": "고양이가 매트 위에 앉아 있는 사진입니다.",
    "mixed": "GNOME 설정에서 Wi-Fi를 켜세요 (version 3.2)!",
    "emoji": "Party time 🎉👋🏽 👨‍👩‍👧 가족 ❤️ 🇰🇷",
    "odd_whitespace": "  tabs\there\n\nnew\r\nlines\u00a0nbsp\u3000ideographic\u2003em   end \t",
    "korean_nfd": unicodedata.normalize("NFD", "한국어 자모 분해"),
    "compat_jamo": "ㅋㅋㅋ ㅠㅠ",
    "special_literal": "before <|endoftext|> after <|pad|>",
    "empty": "",
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir) -> BilingualTokenizer:
    return BilingualTokenizer.from_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def report(tiny_tokenizer_dir) -> dict:
    return json.loads((tiny_tokenizer_dir / "tokenizer_meta.json").read_text(encoding="utf-8"))["report"]


@pytest.mark.parametrize("name", list(TEXTS))
def test_roundtrip_exact(tok, name):
    text = TEXTS[name]
    norm = tok.normalize(text)
    assert tok.decode(tok.encode(text)) == norm
    assert tok.decode(tok.encode_batch([text])[0]) == norm  # through SOT/EOT/PAD too
    assert tok.normalize(norm) == norm


def test_normalization(tok):
    assert tok.normalize(TEXTS["odd_whitespace"]) == "tabs here new lines nbsp ideographic em end"
    assert tok.normalize("Hello WORLD") == "hello world"
    composed = tok.normalize(TEXTS["korean_nfd"])
    assert composed == "한국어 자모 분해" and len(composed) == 9  # syllables stay composed
    assert tok.normalize("ㅋ") == "\u314b"  # NFC keeps compatibility jamo as they are


def test_special_ids_and_vocab(tok, tiny_tokenizer_dir):
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    assert tok.vocab_size == 2000 and tok.context_length == CONTEXT_LENGTH == 77
    meta = json.loads((tiny_tokenizer_dir / "tokenizer_meta.json").read_text(encoding="utf-8"))
    assert meta["special_tokens"]["eot"] == {"token": EOT_TOKEN, "id": 2}
    assert meta["normalization"] == {"unicode": "nfc", "lowercase": True, "whitespace": "collapse+strip"}
    # Whole syllables are vocabulary entries (byte-level merges rebuild them).
    assert [tok.decode([i]) for i in tok.encode("파일을")] == ["파일", "을"]


def test_batch_layout(tok):
    texts = [TEXTS["english"], TEXTS["korean"], TEXTS["mixed"], ""]
    import torch

    batch = tok.encode_batch(texts)
    assert batch.shape == (4, 77) and batch.dtype == torch.int64
    for row, text in zip(batch.tolist(), texts):
        ids = tok.encode(text)
        n = len(ids)
        assert row[0] == tok.sot_id
        assert row[1: n + 1] == ids
        assert row[n + 1] == tok.eot_id
        assert row[n + 2:] == [tok.pad_id] * (77 - n - 2)
        assert row.count(tok.eot_id) == 1 and row.count(tok.sot_id) == 1
    assert batch[3, :3].tolist() == [1, 2, 0]
    assert tok.encode_texts(texts) == [tok.encode(t) for t in texts]
    assert tok(["x"]).equal(tok.encode_batch("x"))


def test_special_token_text_is_not_special(tok):
    row = tok.encode_batch([TEXTS["special_literal"]])[0].tolist()
    assert row.count(tok.eot_id) == 1 and row.count(tok.pad_id) == 77 - len(tok.encode(TEXTS["special_literal"])) - 2
    assert tok.eot_id not in tok.encode(TEXTS["special_literal"])


@pytest.mark.parametrize("text", ["word " * 200, "한국어 문장 " * 100, "x" * 75])
def test_truncation_keeps_eot(tok, text):
    ids = tok.encode(text)
    row = tok.encode_batch([text, "short"])[0].tolist()
    assert row[0] == tok.sot_id and row[76] == tok.eot_id and row.count(tok.eot_id) == 1
    assert row[1:76] == ids[:75]
    assert tok.pad_id not in row[1:76] or len(ids) < 75
    short = tok.encode_batch([text], context_length=16)
    assert short.shape == (1, 16) and short[0, 15].item() == tok.eot_id and short[0, 1:15].tolist() == ids[:14]


def test_exact_fit_has_no_padding(tok):
    text = "x" * 300
    n = len(tok.encode(text))
    fit = tok.decode(tok.encode(text)[:75])
    assert n > 75 and len(tok.encode(fit)) == 75
    row = tok.encode_batch([fit])[0].tolist()
    assert row[76] == tok.eot_id and tok.pad_id not in row
    with pytest.raises(ValueError, match="context_length"):
        tok.encode_batch(["a"], context_length=1)


def test_korean_fertility_and_report(tok, report, data_dir):
    ko, en = report["languages"]["ko"]["heldout"], report["languages"]["en"]["heldout"]
    # UTF-8 spends 3 bytes per syllable; the BPE far fewer tokens than bytes.
    assert ko["tokens_per_line"] < 0.4 * ko["bytes_per_line"]
    assert ko["tokens_per_char"] < 1.0 and en["tokens_per_char"] < 0.5
    assert ko["roundtrip_failures"] == en["roundtrip_failures"] == 0
    assert 0.0 <= ko["truncated_share"] < 0.1
    assert 0.1 < report["hangul_vocab_share"] < 0.9
    assert report["vocab_size"] == 2000 and report["non_utf8_skipped"] == 0
    # Recount a few held-out-style lines directly.
    lines = (data_dir / "corpus" / "ko.txt").read_text(encoding="utf-8").splitlines()[-200:]
    n_tok = sum(len(tok.encode(x)) for x in lines)
    n_byte = sum(len(tok.normalize(x).encode("utf-8")) for x in lines)
    assert n_tok < 0.4 * n_byte


def test_balanced_sampling(report, data_dir):
    en, ko = report["languages"]["en"], report["languages"]["ko"]
    # 8000 lines read per file, 800 held out each -> k = min(7200/2, 7200/1.5) = 3600.
    assert (en["train_lines"], ko["train_lines"]) == (7200, 5400)
    assert (en["heldout"]["lines"], ko["heldout"]["lines"]) == (800, 800)
    files = [str(data_dir / "corpus" / "en.txt"), str(data_dir / "corpus" / "ko.txt")]
    streams = sample_corpus(files, ratios=[1.0, 3.0], heldout_lines=500, seed=1)
    s_en, s_ko = streams
    assert (s_en.lines_seen, s_ko.lines_seen) == (20000, 15000)
    # ko is the limiting stream: 14,500 lines after hold-out -> k = 14500 / 3.
    assert len(s_ko.train) == 14500 and len(s_en.train) == 4833
    assert not set(s_ko.heldout) & set(s_ko.train) and len(s_ko.heldout) == 500
    again = sample_corpus(files, ratios=[1.0, 3.0], heldout_lines=500, seed=1)
    assert again[0].train == s_en.train  # deterministic for a seed


def test_guess_language():
    assert [guess_language(p) for p in ["x/en.txt", "wiki_korean.txt.gz", "cc-ko-2024.txt", "de.txt"]] == \
        ["en", "ko", "ko", "de"]


def test_bad_input(tmp_path, data_dir):
    en = str(data_dir / "corpus" / "en.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([en, str(tmp_path / "nope.txt")], str(tmp_path / "o"), vocab_size=300)
    empty = tmp_path / "empty_ko.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.*empty_ko.txt"):
        train_tokenizer([en, str(empty)], str(tmp_path / "o"), vocab_size=300)
    with pytest.raises(ValueError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer([en], str(tmp_path / "o"), vocab_size=MIN_VOCAB_SIZE - 1)
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"\xff\xfe bad\n\n   \n\xc3\x28\n")
    with pytest.raises(ValueError, match="no usable lines.*2 non-UTF-8, 2 blank"):
        train_tokenizer([str(junk)], str(tmp_path / "o"), vocab_size=300)
    with pytest.raises(ValueError, match="--ratios"):
        train_tokenizer([en], str(tmp_path / "o"), ratios=[1.0, 2.0])
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_non_utf8_lines_counted_nfkc_no_lowercase(tmp_path, data_dir):
    lines = (data_dir / "corpus" / "ko.txt").read_bytes().splitlines()[:400]
    bad = [b"\xff broken", b"caf\xe9 latin-1", b"\xed\xa0\x80 surrogate"]
    ko = tmp_path / "ko.txt"
    ko.write_bytes(b"\n".join(lines[:100] + bad[:2] + lines[100:] + bad[2:]) + b"\n")
    out = tmp_path / "out"
    rep = train_tokenizer([str(ko)], str(out), vocab_size=400, normalization="nfkc", lowercase=False, seed=3)
    assert rep["non_utf8_skipped"] == 3 and rep["languages"]["ko"]["non_utf8_skipped"] == 3
    assert rep["languages"]["ko"]["lines_seen"] == 400
    tok = BilingualTokenizer.from_dir(out)
    assert tok.normalize("ﬁle ＡＢＣ") == "file ABC"  # NFKC folds, case kept
    assert tok.decode(tok.encode("Ｘ ﬁ 한국")) == "X fi 한국"


def test_save_load_and_missing_files(tok, tmp_path):
    tok.save(tmp_path / "copy")
    again = BilingualTokenizer.from_dir(tmp_path / "copy")
    texts = list(TEXTS.values())
    assert again.encode_batch(texts).equal(tok.encode_batch(texts))
    (tmp_path / "copy" / "tokenizer_meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_meta.json"):
        BilingualTokenizer.from_dir(tmp_path / "copy")


def test_loadable_by_tokenizers_and_transformers(tok, tiny_tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = str(tiny_tokenizer_dir / "tokenizer.json")
    text = TEXTS["mixed"]
    expected = [tok.sot_id, *tok.encode(text), tok.eot_id]
    assert Tokenizer.from_file(path).encode(text).ids == expected
    hf = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|startoftext|>", eos_token=EOT_TOKEN,
                                 pad_token="<|pad|>")
    assert hf(text)["input_ids"] == expected
    assert hf.decode(expected, skip_special_tokens=True) == tok.normalize(text)
    assert hf.pad_token_id == tok.pad_id and hf.eos_token_id == tok.eot_id


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--corpus", str(tmp_path / "missing_en.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing_en.txt" in err and "Traceback" not in err
    assert main(["--corpus", str(tmp_path / "x.txt"), "--vocab-size", "100"]) == 2
    assert "below the byte-level minimum" in capsys.readouterr().err


def test_training_does_not_import_torch():
    code = "import sys, tokenizer.train; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_end_to_end(tmp_path, data_dir):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "tokenizer.train", "--corpus", str(data_dir / "corpus" / "en.txt"),
         str(data_dir / "corpus" / "ko.txt"), "--vocab-size", "600", "--max-lines-per-file", "3000",
         "--out", str(out), "--ratios", "1", "1", "--seed", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "vocab size 600" in proc.stdout and "contain Hangul" in proc.stdout
    meta = json.loads((out / "tokenizer_meta.json").read_text(encoding="utf-8"))
    langs = meta["report"]["languages"]
    assert langs["en"]["train_lines"] == langs["ko"]["train_lines"] == 2700
    tok = BilingualTokenizer.from_dir(out)
    assert tok.vocab_size == 600 and tok.decode(tok.encode(TEXTS["emoji"])) == tok.normalize(TEXTS["emoji"])


@pytest.mark.shared_data
def test_full_corpus_slice(shared_data_dir, tmp_path):
    corpus = shared_data_dir / "corpus"
    rep = train_tokenizer([str(corpus / "en.txt"), str(corpus / "ko.txt")], str(tmp_path),
                          vocab_size=8000, max_lines_per_file=30000, seed=0)
    ko = rep["languages"]["ko"]["heldout"]
    assert ko["lines"] == 2000 and ko["roundtrip_failures"] == 0
    assert ko["tokens_per_line"] < 0.25 * ko["bytes_per_line"]
    assert rep["languages"]["en"]["train_lines"] * 3 == rep["languages"]["ko"]["train_lines"] * 4
