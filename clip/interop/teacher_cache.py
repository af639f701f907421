"""A teacher's text embeddings computed once (``distill.cache``): a safetensors file of the
teacher's unit vectors of every training target, keyed by the sentences (in order) and the
teacher's fingerprint (:attr:`clip.interop.teacher.Teacher.fingerprint`), so a stale file is refused
instead of read."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from clip.interop.teacher import Teacher

CACHE_FORMAT = "enko-clip/teacher-text-cache/v1"


def sentences_key(texts: Sequence[str]) -> str:
    """First 16 hex digits of the sha256 of a sentence list (in order)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def check_text_cache(path: str | os.PathLike, teacher: Teacher, texts: Sequence[str]) -> bool:
    """Whether a cache of the teacher's embeddings of ``texts`` exists at ``path`` (False: none yet).
    One ValueError line when the file there is another thing or is stale: written for other
    sentences or by another teacher."""
    p = Path(path)
    if not p.exists():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise ValueError(f"{p}: not a teacher-embedding cache ({type(e).__name__}); delete it or choose another "
                         "distill.cache") from None
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{p}: not a teacher-embedding cache (format {meta.get('format')!r}); choose another "
                         "distill.cache")
    want = {"sentences": sentences_key(texts), "count": str(len(texts)), "teacher": teacher.fingerprint}
    stale = [k for k, v in want.items() if meta.get(k) != v]
    if stale:
        what = "another teacher" if stale == ["teacher"] else "other sentences"
        was = ", ".join(f"{k} {meta.get(k)}, now {want[k]}" for k in stale)
        raise ValueError(f"{p} is stale: written for {what} ({was}); delete it or choose another distill.cache")
    return True


def write_text_cache(path: str | os.PathLike, teacher: Teacher, texts: Sequence[str], batch_size: int = 256) -> None:
    """Encode ``texts`` with the teacher once and write ``{"embeddings": (N, E) float32}`` as
    safetensors (atomically), keyed by :func:`sentences_key` and the teacher's fingerprint."""
    from safetensors.torch import save

    from mae.common.files import atomic_write_bytes

    emb = teacher.encode_text(list(texts), batch_size).cpu().contiguous()
    meta = {"format": CACHE_FORMAT, "sentences": sentences_key(texts), "count": str(len(texts)),
            "teacher": teacher.fingerprint, "teacher_path": teacher.where}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"embeddings": emb}, metadata=meta))


def read_text_cache(path: str | os.PathLike, teacher: Teacher, texts: Sequence[str]) -> torch.Tensor:
    """The cached (N, E) embeddings, after :func:`check_text_cache` (FileNotFoundError when none)."""
    from safetensors.torch import load_file

    if not check_text_cache(path, teacher, texts):
        raise FileNotFoundError(f"teacher-embedding cache not found: {path}")
    return load_file(str(path))["embeddings"]
