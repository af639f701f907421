"""Metadata entries per language and the substring matcher that counts them (MetaCLIP's
``substr_matching``).

Text and entries are normalised the same way (:func:`normalize`): NFC, case folded, every run of
characters that are not letters or digits turned into one space. An entry then matches where it
starts at a word start: English (and any language written with spaces) entries must also end at
a word end (" new york " inside " a new york taxi "). Korean ones may not: particles and endings
attach to the noun (" 사과" matches "사과를", "사과가"), which also lets an entry match the head of a
compound ("사과나무"), as substring matching does. An entry of a single Hangul syllable (차, 눈,
배) would match the first syllable of thousands of unrelated words that way, so it matches only
as a whole word or followed by one of :data:`KO_PARTICLES` (" 눈 ", " 눈이 ", " 눈을 " ...). Han
and kana entries (Japanese, Chinese) match anywhere, having no spaces to anchor to.

Matching runs on batches: the captions of a batch joined into one string, one Aho–Corasick pass
(ahocorasick-rs, overlapping matches) finds every entry occurrence, and numpy assigns them to
captions; a caption counts each entry once.

Metadata files are UTF-8 text, one entry per line; blank lines and duplicates (after
normalisation) are ignored. :func:`build_metadata` makes entries from a text corpus as MetaCLIP
makes them from Wikipedia: frequent words, and word bigrams ranked by pointwise mutual information.
"""
from __future__ import annotations

import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

_NONWORD = re.compile(r"(?:[^\w\n]|_)+")
_NONWORD_LINE = re.compile(r"[\W_]+")
_HANGUL = re.compile("[\uac00-\ud7a3]")
_SPACELESS = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # kana, Han
KO_PARTICLES = ("이", "가", "을", "를", "은", "는", "의", "에", "에서", "에게", "와", "과", "도", "만", "로", "으로",
                "랑", "이랑", "하고", "까지", "부터", "보다", "처럼", "마다", "이나", "나", "에는", "에도", "으로는",
                "로는", "이다", "입니다")


def normalize(text: str) -> str:
    """NFC, case folded, runs of non-letters/digits as one space, stripped."""
    return _NONWORD_LINE.sub(" ", unicodedata.normalize("NFC", text).casefold()).strip()


def normalize_many(texts: Sequence[str]) -> list[str]:
    """:func:`normalize` of each text, in one pass over them all."""
    joined = unicodedata.normalize("NFC", "\n".join(t.replace("\n", " ") for t in texts)).casefold()
    return [t.strip() for t in _NONWORD.sub(" ", joined).split("\n")] if texts else []


def patterns(entry: str) -> list[str]:
    """The strings searched for a normalised entry in a normalised, space-padded text (module
    docstring): word-anchored at both ends, at the start only (Korean), or bare (Han, kana)."""
    first, last = entry[0], entry[-1]
    start = "" if _SPACELESS.match(first) else " "
    if _HANGUL.match(last):
        if len(entry) == 1:  # a single syllable: the whole word, or the word and a particle
            return [f" {entry} "] + [f" {entry}{p} " for p in KO_PARTICLES]
        return [f"{start}{entry}"]
    return [f"{start}{entry}{'' if _SPACELESS.match(last) else ' '}"]


# ----------------------------------------------------------------------------- metadata files
def read_text(path: str | os.PathLike, what: str = "metadata") -> str:
    """The contents of a UTF-8 text file. FileNotFoundError, or ValueError (one line naming the
    file) for one that is not text (NUL bytes, invalid UTF-8)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data[:65536]:
        raise ValueError(f"{path}: not a text file (NUL bytes); {what} is UTF-8 text, one entry per line")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); {what} is UTF-8 text, one entry per line") from None


def read_entries(path: str | os.PathLike) -> list[str]:
    """The entries of a metadata file (module docstring), normalised, in file order; ValueError
    as :func:`read_text`, or for a file without entries."""
    text = read_text(path)
    entries = list(dict.fromkeys(e for e in (normalize(line) for line in text.splitlines()) if e))
    if not entries:
        raise ValueError(f"{os.fspath(path)}: no metadata entries (one per line expected)")
    return entries


def _strip_particle(word: str) -> str:
    """A Korean word without one trailing particle, when at least two syllables remain."""
    for p in sorted(KO_PARTICLES, key=len, reverse=True):
        if word.endswith(p) and len(word) - len(p) >= 2 and _HANGUL.match(word[-len(p) - 1]):
            return word[: -len(p)]
    return word


def build_metadata(lines: Iterable[str], lang: str, min_count: int = 3, max_unigrams: int = 250_000,
                   bigram_ratio: float = 0.4) -> list[str]:
    """Entries from a corpus (one text per line): the words seen at least ``min_count`` times, most
    frequent first (at most ``max_unigrams``), then word bigrams seen ``min_count`` times, ranked by
    pointwise mutual information, ``bigram_ratio`` times as many as the words (MetaCLIP 2's 40 %).
    Korean words lose one trailing particle first (사과를 -> 사과), so the entry is the noun. Words
    without a letter (numbers) are skipped."""
    words: Counter = Counter()
    pairs: Counter = Counter()
    for line in lines:
        toks = [t for t in normalize(line).split() if not t.isdigit()]
        if lang == "ko":
            toks = [_strip_particle(t) for t in toks]
        words.update(toks)
        pairs.update(zip(toks, toks[1:]))
    unigrams = [w for w, n in words.most_common(max_unigrams) if n >= min_count]
    total_w, total_p = sum(words.values()) or 1, sum(pairs.values()) or 1

    def pmi(pair, n):
        return math.log(n / total_p) - math.log(words[pair[0]] / total_w) - math.log(words[pair[1]] / total_w)

    ranked = sorted(((pmi(p, n), f"{p[0]} {p[1]}") for p, n in pairs.items() if n >= min_count and p[0] != p[1]),
                    reverse=True)
    bigrams = [b for _, b in ranked[: int(bigram_ratio * len(unigrams))]]
    return list(dict.fromkeys(unigrams + bigrams))


# ----------------------------------------------------------------------------- matching
class Matcher:
    """Aho–Corasick matcher over one language's entries.

    Args:
        entries: normalised entries (:func:`read_entries`, :func:`build_metadata`); entry ``i`` is
            reported as ``i``.
    """

    def __init__(self, entries: Sequence[str]):
        import ahocorasick_rs

        self.entries = list(entries)
        pats, ids = [], []
        for i, e in enumerate(self.entries):
            for p in patterns(e):
                pats.append(p)
                ids.append(i)
        self.pattern_entry = np.asarray(ids, dtype=np.int64)  # pattern index -> entry id
        self.automaton = ahocorasick_rs.AhoCorasick(pats) if pats else None

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Entries matched by each text, as CSR arrays ``(offsets (N+1,), ids)``: text ``i`` matched
        ``ids[offsets[i]:offsets[i+1]]`` (sorted, each entry once)."""
        n = len(texts)
        if n == 0 or self.automaton is None:
            return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        # "\n" never survives normalisation inside a caption, so it separates them
        joined = unicodedata.normalize("NFC", " \n ".join(t.replace("\n", " ") for t in texts))
        big = " " + _NONWORD.sub(" ", joined.casefold()) + " "
        found = self.automaton.find_matches_as_indexes(big, overlapping=True)
        m = np.asarray(found, dtype=np.int64).reshape(-1, 3)  # (matches, [pattern, start, end])
        breaks = np.flatnonzero(np.frombuffer(big.encode("utf-32-le"), dtype=np.uint32) == 10)
        text_of = np.searchsorted(breaks, m[:, 2])  # a match ends before its text's break
        E = len(self.entries)
        pairs = np.unique(text_of * E + self.pattern_entry[m[:, 0]])  # each (text, entry) once, sorted
        ids = pairs % E
        offsets = np.searchsorted(pairs // E, np.arange(n + 1))
        return offsets.astype(np.int64), ids
