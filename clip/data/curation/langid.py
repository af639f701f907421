"""Which language a caption is in, and what to do with one filed under the wrong language.

The identifier is py3langid (langid.py's naive Bayes over byte n-grams, 97 languages; its model
ships in the wheel), restricted to a candidate set: the curated languages plus the scripts' usual
confusables (``ja``, ``zh``). Restricting it is what makes it usable on captions a few words long.
Scripts decide first where they can: a caption whose letters are all Hangul is Korean whatever
the model says, and a caption in one script that only one candidate writes (Latin when ``en`` is
the only Latin candidate; kana for Japanese) gets that language without calling the model; on
those captions the model and the script agree (README, "From a crawl to a training set"), so this
only saves time. Everything else (several scripts, Han characters alone, other scripts, or
several candidates sharing the script) goes to the model.

A caption is *mixed* when two script groups (Hangul, kana, Han, Latin, other letters) each hold
at least :data:`MIXED_MIN_WORDS` words: a sentence in each language, not a brand name or an
acronym inside a Korean caption ("RPC 오류" is Korean). A caption with no letters at all (digits,
emoji) keeps the language it was filed under.

What happens to a caption filed under ``filed`` and identified as ``found``
(:meth:`LanguageIdentifier.check`): ``found == filed`` and not mixed: kept; ``mislabelled =
"relabel"``: moved to ``found`` (mixed ones to the language the identifier names), dropped when
``found`` is not a curated language; ``mislabelled = "drop"``: every mislabelled or mixed caption
is dropped. Each outcome is counted.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

MIXED_MIN_WORDS = 3
CONFUSABLES = ("ja", "zh")  # languages whose captions turn up under ko in a crawl
Mislabelled = Literal["relabel", "drop"]

_SCRIPTS = {  # script group -> character class
    "hangul": "\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f",
    "kana": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f",
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
}
_SCRIPT_RE = {name: re.compile(f"[{chars}]") for name, chars in _SCRIPTS.items()}
_KNOWN = "".join(_SCRIPTS.values())
_OTHER_LETTER = re.compile(f"[^\\W\\d_{_KNOWN}]")  # letters of any other script
_WORD = re.compile(r"[^\W_]+")


def known_languages() -> list[str]:
    """The language codes the identifier knows (ISO 639-1 where one exists)."""
    return list(_model().labels)


_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier as _Identifier

        _MODEL = _Identifier.from_model_file(MODEL_FILE)
    return _MODEL


def scripts_of(text: str) -> set[str]:
    """The script groups with at least one letter in ``text`` (``other`` for any other script)."""
    found = {name for name, rx in _SCRIPT_RE.items() if rx.search(text)}
    if _OTHER_LETTER.search(text):
        found.add("other")
    return found


def _word_script(word: str) -> str | None:
    for name, rx in _SCRIPT_RE.items():
        if rx.search(word):
            return "ja" if name == "kana" else name
    return None if word.isdigit() else "other"


def is_mixed(text: str) -> bool:
    """Whether two script groups each hold at least :data:`MIXED_MIN_WORDS` words of ``text``
    (kana and Han count as one group, Japanese)."""
    counts: dict[str, int] = {}
    for w in _WORD.findall(text):
        s = _word_script(w)
        if s is not None:
            counts[s] = counts.get(s, 0) + 1
    return sum(n >= MIXED_MIN_WORDS for n in counts.values()) >= 2


class LanguageIdentifier:
    """Identify captions among ``candidates`` and sort out mislabelled ones.

    Args:
        languages: the curated languages (captions identified as another language are dropped).
        candidates: the identifier's candidate languages; default ``languages`` plus ``ja``, ``zh``.
        mislabelled: ``"relabel"`` or ``"drop"`` (module docstring).
    """

    def __init__(self, languages: Sequence[str], candidates: Sequence[str] = (), mislabelled: Mislabelled = "relabel"):
        if mislabelled not in ("relabel", "drop"):
            raise ValueError(f"mislabelled must be relabel or drop, got {mislabelled!r}")
        self.languages = tuple(languages)
        self.candidates = tuple(dict.fromkeys([*languages, *(candidates or CONFUSABLES)]))
        unknown = [c for c in self.candidates if c not in known_languages()]
        if unknown:
            raise ValueError(f"unknown language code {unknown[0]!r} (known: {' '.join(sorted(known_languages()))})")
        self.mislabelled = mislabelled
        self.model = None
        # a script decides alone when exactly one candidate writes it (Han never: zh, ja and ko use it)
        latin = [c for c in self.candidates if c not in ("ko", "ja", "zh")]
        self.decides = {"hangul": "ko" if "ko" in self.candidates else None,
                        "kana": "ja" if "ja" in self.candidates else None,
                        "latin": latin[0] if len(latin) == 1 else None}

    def identify(self, text: str) -> str | None:
        """The language of ``text`` among the candidates; None when it has no letters."""
        return self._identify(text)[0]

    def _identify(self, text: str) -> tuple[str | None, bool]:
        """(language, whether ``text`` has letters of several script groups)."""
        scripts = scripts_of(text)
        if not scripts:
            return None, False
        if scripts == {"kana", "han"}:  # Japanese writes both
            scripts = {"kana"}
        found = self.decides.get(next(iter(scripts))) if len(scripts) == 1 else None
        if found is not None:
            return found, False
        if self.model is None:
            import copy

            self.model = copy.copy(_model())  # its own candidate restriction; the tables are shared
            self.model.set_languages(self.candidates)
        return self.model.classify(text)[0], len(scripts) > 1

    def check(self, captions: dict[str, list[str]], counts: dict[str, int]) -> dict[str, list[str]]:
        """``captions`` ({filed language: [text]}) with mislabelled ones relabelled or dropped;
        ``counts`` gets ``lid_kept``, ``lid_relabelled``, ``lid_mixed``, ``lid_dropped_mislabelled``,
        ``lid_dropped_other_language``, ``lid_no_letters`` added."""
        out: dict[str, list[str]] = {}
        for filed, texts in captions.items():
            for text in texts:
                found, several = self._identify(text)
                if found is None:
                    lang, outcome = filed, "lid_no_letters"
                elif several and is_mixed(text):
                    lang, outcome = (found, "lid_mixed") if self.mislabelled == "relabel" else (None, "lid_mixed")
                elif found == filed:
                    lang, outcome = filed, "lid_kept"
                elif self.mislabelled == "drop":
                    lang, outcome = None, "lid_dropped_mislabelled"
                else:
                    lang, outcome = found, "lid_relabelled"
                if lang is not None and lang not in self.languages:
                    lang, outcome = None, "lid_dropped_other_language"
                counts[outcome] = counts.get(outcome, 0) + 1
                if lang is not None:
                    out.setdefault(lang, []).append(text)
        return out

