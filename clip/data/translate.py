"""Caption translation, the data step of Parallel Multilingual CLIP (Krasner & Lanuzo translate
COCO's English captions into Spanish, Japanese and Hindi), with a local transformers seq2seq model:

    python -m clip.translate --manifest IN.jsonl --model LOCAL_MT_FOLDER --source en --targets es ja hi \\
        --out OUT.jsonl [--batch-size 32] [--device cuda]

Model families and their language conventions (read from the model's config and tokenizer):
  * **Marian** (opus-mt): one model per language pair (``--model es=opus-mt-en-es ja=opus-mt-en-jap``),
    or one multi-target model whose vocabulary holds ``>>xx<<`` tokens, put before each caption;
  * **NLLB-200**: ``tokenizer.src_lang`` and ``forced_bos_token_id`` in FLORES-200 codes (``kor_Hang``);
    ISO codes (``ko``, ``es`` ...) are mapped with :data:`NLLB_CODES`, FLORES codes pass through;
  * **M2M-100**: ``tokenizer.src_lang`` and ``forced_bos_token_id = tokenizer.get_lang_id(target)``.

Each output row is the input row with ``captions`` holding the source captions and their
translations, ``{"captions": {"en": [...], "es": [...], ...}}``: the field training reads
(:func:`clip.data.pairs.extract_captions`); a relative ``file`` is rewritten against the output's folder.
Rows are appended in input order, a batch at a time, flushed and fsynced, so a killed run loses at
most the batch in flight; a re-run skips every key already in ``--out`` (rows are keyed by ``key``,
else ``file``) and first cuts a torn last line. Bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mae.common.files import iter_jsonl

# ISO 639-1 -> FLORES-200 codes of NLLB (the paper's languages, its zero-shot ones, and ours)
NLLB_CODES = {"en": "eng_Latn", "ko": "kor_Hang", "es": "spa_Latn", "ja": "jpn_Jpan", "hi": "hin_Deva",
              "de": "deu_Latn", "fr": "fra_Latn", "zh": "zho_Hans", "bn": "ben_Beng", "it": "ita_Latn",
              "pt": "por_Latn", "ru": "rus_Cyrl", "ar": "arb_Arab", "tr": "tur_Latn", "pl": "pol_Latn",
              "vi": "vie_Latn", "th": "tha_Thai", "id": "ind_Latn", "nl": "nld_Latn", "uk": "ukr_Cyrl"}


class Translator:
    """One local seq2seq model translating from ``source`` into the targets it supports.

    Args:
        folder: a ``save_pretrained`` folder (model + tokenizer); nothing is downloaded.
        source: source language (ISO code, or the model's own code).
        device, max_new_tokens, num_beams: generation settings.
    """

    def __init__(self, folder: str, source: str, device: str = "cpu", max_new_tokens: int = 64, num_beams: int = 1):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"--model {folder}: not a local transformers model folder (no config.json)")
        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.folder, self.source, self.device, self.torch = folder, source, device, torch
        self.gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        kind = self.model.config.model_type
        if kind == "marian":
            self.family = "marian"
        elif "nllb" in type(self.tok).__name__.lower():
            self.family = "nllb"
        elif kind == "m2m_100":
            self.family = "m2m"
        else:
            raise ValueError(f"--model {folder}: model type {kind!r} is not Marian, NLLB or M2M-100")
        if self.family == "nllb":
            self.tok.src_lang = NLLB_CODES.get(source, source)
        elif self.family == "m2m":
            self.tok.src_lang = source

    def prefix(self, target: str) -> str | None:
        """Marian's ``>>xx<<`` target token, if this model has one for ``target``."""
        token = f">>{target}<<"
        return token if token in self.tok.get_vocab() else None

    def supports(self, target: str) -> bool:
        if self.family == "marian":
            return self.prefix(target) is not None or not any(t.startswith(">>") for t in self.tok.get_vocab())
        if self.family == "nllb":
            return self.tok.convert_tokens_to_ids(NLLB_CODES.get(target, target)) != self.tok.unk_token_id
        return target in getattr(self.tok, "lang_code_to_id", {}) or _has_m2m_lang(self.tok, target)

    def inputs(self, texts: Sequence[str], target: str) -> dict:
        """The encoded batch for ``target`` (Marian: with its ``>>xx<<`` token first)."""
        pre = self.prefix(target) if self.family == "marian" else None
        texts = [f"{pre} {t}" for t in texts] if pre else list(texts)
        return self.tok(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)

    def __call__(self, texts: Sequence[str], target: str) -> list[str]:
        if not texts:
            return []
        kw = dict(self.gen)
        if self.family == "nllb":
            kw["forced_bos_token_id"] = self.tok.convert_tokens_to_ids(NLLB_CODES.get(target, target))
        elif self.family == "m2m":
            kw["forced_bos_token_id"] = self.tok.get_lang_id(target)
        with self.torch.inference_mode():
            out = self.model.generate(**self.inputs(texts, target), **kw)
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]


def _has_m2m_lang(tok, lang: str) -> bool:
    try:
        tok.get_lang_id(lang)
        return True
    except (KeyError, AttributeError):
        return False


def row_key(row: dict, lineno: int, where: str) -> str:
    key = row.get("key", row.get("file"))
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}:{lineno}: a row needs a string 'key' or 'file' to resume by")
    return key


def done_keys(out: Path) -> set[str]:
    """Keys already written to ``out``; a torn last line (no newline: the run was killed while
    writing it) is cut off first. A complete line that is not a JSON row is a ValueError."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"clip.data.translate: cutting a torn last line of {out} ({len(data) - end} bytes)", file=sys.stderr)
        with open(out, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    keys = set()
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                keys.add(row_key(json.loads(line), lineno, str(out)))
            except json.JSONDecodeError:
                raise ValueError(f"{out}:{lineno}: not a JSON row; is --out another file?") from None
    return keys


def read_rows(manifest: Path) -> list[tuple[str, dict]]:
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    rows, seen = [], set()
    for lineno, row in iter_jsonl(manifest):
        key = row_key(row, lineno, str(manifest))
        if key in seen:
            raise ValueError(f"{manifest}:{lineno}: key {key!r} appears twice; rows are resumed by key")
        seen.add(key)
        rows.append((key, row))
    return rows


def translate_manifest(manifest: str | os.PathLike, out: str | os.PathLike, translators: dict[str, Translator],
                       source: str, targets: Sequence[str], batch_size: int = 32, progress: bool = False) -> dict:
    """Translate the ``source`` captions of every row not yet in ``out`` into ``targets`` and append
    the rows (see the module docstring). ``translators`` maps each target to its model.
    Returns ``{"rows", "already_done", "translated", "no_source_caption"}``."""
    from tqdm import tqdm

    from clip.data.pairs import extract_captions

    manifest, out = Path(manifest), Path(out)
    rows = read_rows(manifest)
    done = done_keys(out)
    todo = [(k, r) for k, r in rows if k not in done]
    rebase = manifest.resolve().parent != out.resolve().parent
    stats = {"rows": len(rows), "already_done": len(rows) - len(todo), "translated": 0, "no_source_caption": 0}
    bar = tqdm(total=len(rows), initial=stats["already_done"], desc="rows", unit="row", file=sys.stderr,
               disable=not progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as f:
        for s in range(0, len(todo), batch_size):
            batch = todo[s : s + batch_size]
            sources = [extract_captions(r, [source])[0].get(source, []) for _, r in batch]
            flat = [c for caps in sources for c in caps]
            translated = {t: iter(translators[t](flat, t)) for t in targets}  # one generate per target per batch
            lines = []
            for (_, row), caps in zip(batch, sources):
                row = dict(row)
                if caps:
                    nested = dict(row["captions"]) if isinstance(row.get("captions"), dict) else {}
                    nested[source] = caps
                    for t in targets:
                        nested[t] = [next(translated[t]) for _ in caps]
                    row["captions"] = nested
                    stats["translated"] += 1
                else:
                    stats["no_source_caption"] += 1
                if rebase and isinstance(row.get("file"), str) and not os.path.isabs(row["file"]):
                    row["file"] = os.path.relpath(manifest.resolve().parent / row["file"], out.resolve().parent)
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return stats


def build_translators(models: Sequence[str], source: str, targets: Sequence[str], device: str = "cpu",
                      max_new_tokens: int = 64, num_beams: int = 1) -> dict[str, Translator]:
    """``{target: Translator}`` from ``--model`` values: one folder for every target, or ``lang=folder``
    pairs (Marian's one model per pair). Every target must be covered by a model that supports it."""
    per_target = dict(m.split("=", 1) for m in models if "=" in m)
    shared = [m for m in models if "=" not in m]
    if len(shared) > 1:
        raise ValueError(f"--model: several folders without a language ({shared}); write them as lang=FOLDER")
    loaded: dict[str, Translator] = {}
    out = {}
    for t in targets:
        folder = per_target.get(t) or (shared[0] if shared else None)
        if folder is None:
            raise ValueError(f"--model: no model for target {t!r}; add {t}=FOLDER")
        if folder not in loaded:
            loaded[folder] = Translator(folder, source, device, max_new_tokens, num_beams)
        tr = loaded[folder]
        if not tr.supports(t):
            raise ValueError(f"--model {folder}: this {tr.family} model cannot translate into {t!r}")
        if tr.family == "marian" and tr.prefix(t) is None and sum(x == folder for x in
                                                                   [per_target.get(y) or shared[0] for y in targets]) > 1:
            raise ValueError(f"--model {folder}: a single-pair Marian model (no >>xx<< tokens) serves several "
                             "targets; give one model per target as lang=FOLDER")
        out[t] = tr
    return out
