"""Multilingual evaluation inputs: the languages of a manifest, the standard multilingual retrieval
layouts, and the Babel-ImageNet class names that ship with ``clip-benchmark``.

Parallel Multilingual CLIP evaluates every language it can, including languages never trained on.
These readers turn the public layouts into manifest rows (``{"key", "path", "file", "captions":
{lang: [...]}}``, as :func:`mae.images.sources.iter_manifest` gives them), so :func:`clip.eval.tasks.evaluate_retrieval`
reads them like any manifest; nothing is downloaded:

* **Crossmodal-3600** (Thapliyal et al. 2022, 36 languages, Korean among them): ``captions.jsonl``
  with one object per image, ``{"image/key": K, "<lang>": {"caption": [...], ...}, ...}``, and
  the images as ``images/<K>.jpg`` (the folder ``xm3600/`` of the release).
* **XTD10** (Aggarwal & Kale 2020, 1,000 MSCOCO images, 11 languages with Korean): the image list
  ``test_image_names.txt`` and one caption per line, aligned with it, in
  ``test_1kcaptions_<lang>.txt`` (German and French under ``MIC/``, Japanese under ``STAIR/`` as
  ``jp``), images in ``images/``.
* **Babel-ImageNet** (Geigle et al. 2023): ``clip_benchmark/datasets/babel_imagenet.json`` maps each
  of ~90 languages (upper-case ISO code) to ``[ImageNet class indices, names]``, and
  ``nllb_dist13b_prompts.json`` its prompt templates; each language names its own subset of the
  1,000 classes.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# Codes the readers and `--languages all` recognise as caption languages in flat rows: those of
# Crossmodal-3600 and XTD10 (XTD10 writes Japanese as "jp").
LANGUAGE_CODES = frozenset(
    "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja jp ko mi nl no pl pt quz ro ru sv sw te th tr "
    "uk vi zh".split())
XTD10_FILE_CODES = {"ja": "jp"}  # our code -> the code in XTD10's file names


def manifest_languages(rows: Iterable[Mapping]) -> list[str]:
    """Every caption language of some row, sorted: the keys of ``row["captions"]``, and top-level
    fields named by a language code (``en``, ``ko`` ... of :data:`LANGUAGE_CODES`)."""
    found = set()
    for r in rows:
        caps = r.get("captions")
        if isinstance(caps, Mapping):
            found.update(str(k) for k, v in caps.items() if v)
        found.update(k for k in r if k in LANGUAGE_CODES and isinstance(r[k], (str, list)) and r[k])
    return sorted(found)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_xm3600(root: str | Path, languages: Sequence[str] | None = None) -> list[dict]:
    """Rows of a Crossmodal-3600 folder (``captions.jsonl`` + ``images/``), captions of ``languages``
    (default: every language in the file). Images missing on disk are kept: evaluation skips and counts them."""
    root = Path(root)
    if (root / "xm3600").is_dir() and not (root / "captions.jsonl").exists():
        root = root / "xm3600"
    rows = []
    with open(_need(root / "captions.jsonl", "Crossmodal-3600 captions.jsonl"), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                key = str(obj["image/key"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{root / 'captions.jsonl'}:{lineno}: expected an object with 'image/key'") from None
            langs = languages or [k for k, v in obj.items() if isinstance(v, dict) and "caption" in v]
            caps = {lang: list(obj[lang]["caption"]) for lang in langs
                    if isinstance(obj.get(lang), dict) and obj[lang].get("caption")}
            file = f"images/{key}.jpg"
            rows.append({"key": key, "file": file, "path": str(root / file), "captions": caps})
    return rows


def read_xtd10(root: str | Path, languages: Sequence[str]) -> list[dict]:
    """Rows of an XTD10 folder: ``test_image_names.txt``, ``test_1kcaptions_<lang>.txt`` (found
    anywhere under ``root``, e.g. in ``MIC/`` or ``STAIR/``; ``ja`` reads the ``jp`` file) and
    ``images/``. Every caption file must have one line per image."""
    root = Path(root)
    names = [n.strip() for n in _need(root / "test_image_names.txt", "XTD10 test_image_names.txt")
             .read_text(encoding="utf-8").splitlines() if n.strip()]
    rows = [{"key": n, "file": f"images/{n}", "path": str(root / "images" / n), "captions": {}} for n in names]
    for lang in languages:
        code = XTD10_FILE_CODES.get(lang, lang)
        found = sorted(root.rglob(f"test_1kcaptions_{code}.txt"))
        if not found:
            raise FileNotFoundError(f"XTD10 captions for {lang!r} not found under {root} (test_1kcaptions_{code}.txt)")
        lines = found[0].read_text(encoding="utf-8").splitlines()
        if len(lines) != len(rows):
            raise ValueError(f"{found[0]}: {len(lines)} captions for {len(rows)} images in test_image_names.txt")
        for r, text in zip(rows, lines):
            if text.strip():
                r["captions"][lang] = [text.strip()]
    return rows


def read_layout(layout: str, path: str, languages: Sequence[str] | None) -> list[dict]:
    """Rows of ``path`` read as ``manifest`` (JSONL), ``xm3600`` or ``xtd10``."""
    if layout == "manifest":
        from mae.images.sources import iter_manifest
        return list(iter_manifest(path))
    if layout == "xm3600":
        return read_xm3600(path, languages)
    if layout == "xtd10":
        if not languages:
            raise ValueError("the xtd10 layout needs --languages (its caption files are per language)")
        return read_xtd10(path, languages)
    raise ValueError(f"unknown layout {layout!r} (manifest, xm3600, xtd10)")


# ----------------------------------------------------------------------------- Babel-ImageNet

def _clip_benchmark_file(name: str) -> Path:
    try:
        import clip_benchmark.datasets as ds
    except ImportError:
        raise FileNotFoundError(f"{name}: clip-benchmark is not installed (pip install clip-benchmark), "
                                "or pass the file with --babel-imagenet PATH") from None
    return Path(ds.__file__).parent / name


def babel_imagenet(languages: Sequence[str], classnames: str | Path | None = None,
                   prompts: str | Path | None = None) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """``{lang: (labels, names, templates)}`` of Babel-ImageNet: the labels are ImageNet class
    indices as strings (``"0"`` .. ``"999"``), the names that language's, the templates its
    NLLB-translated prompts (``{}`` for the name). Files default to those inside the installed
    ``clip_benchmark`` package. A language it lacks is a ValueError naming the ones it has."""
    cpath = Path(classnames) if classnames else _clip_benchmark_file("babel_imagenet.json")
    ppath = Path(prompts) if prompts else cpath.parent / "nllb_dist13b_prompts.json"
    table = json.loads(_need(cpath, "Babel-ImageNet class names").read_text(encoding="utf-8"))
    temps = json.loads(ppath.read_text(encoding="utf-8")) if ppath.is_file() else {}
    out = {}
    for lang in languages:
        entry = table.get(lang.upper())
        if entry is None:
            raise ValueError(f"Babel-ImageNet has no language {lang!r} in {cpath} (it has {len(table)}: "
                             f"{', '.join(sorted(k.lower() for k in table)[:12])}, ...)")
        idxs, names = entry
        templates = [t.replace("{c}", "{}") for t in temps.get(lang.upper(), [])] or ["{}"]
        out[lang] = ([str(i) for i in idxs], list(names), templates)
    return out
