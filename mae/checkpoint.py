"""Files that must never be left half-written, and the weights-only checkpoints of both stages.

Every file the project writes for later use (exported checkpoints, the resolved config, shards,
``stats.json``, charts) goes through :func:`atomic_open`: a temporary file in the same folder,
flushed and fsynced, renamed over the target, then the folder fsynced, so a crash leaves either
the old file or the new one, never a torn one. (This package is the lowest one with torch; the
CLIP stage and the runtime import it from here.)

An exported checkpoint is a dict ``{"format": TAG, "config": {...}, "model": state dict}`` with
the tensors on the CPU; :func:`load_checkpoint` reads it with ``torch.load(weights_only=True)``,
so a file holding arbitrary pickled objects is refused, never executed. The same content can be
a folder (:func:`save_pretrained`): ``model.safetensors`` (the weights, no pickle at all) and
``config.json`` (``{"format": TAG, "config": {...}, ...}``), the Hugging Face ``save_pretrained``
layout; :func:`load_checkpoint` reads either.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch

MAE_FORMAT = "enko-clip/mae-encoder/v1"
CLIP_FORMAT = "enko-clip/clip/v1"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
FORMAT_NAMES = {MAE_FORMAT: "an MAE encoder export (mae_ckpt.pt)", CLIP_FORMAT: "a CLIP checkpoint (clip_ckpt.pt)"}


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is fsynced and renamed
    over ``path``; on an exception it is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def save_checkpoint(path: str | os.PathLike, fmt: str, config: Mapping[str, Any],
                    state_dict: Mapping[str, torch.Tensor], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``{"format": fmt, "config": config, "model": state dict on the CPU, **extra}`` atomically."""
    payload = {"format": fmt, "config": dict(config),
               "model": {k: v.detach().cpu() for k, v in state_dict.items()}, **(extra or {})}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def save_pretrained(folder: str | os.PathLike, fmt: str, config: Mapping[str, Any],
                    state_dict: Mapping[str, torch.Tensor], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``folder/model.safetensors`` and then ``folder/config.json`` (``{"format": fmt, "config":
    config, **extra}``), each atomically; the config is written last, so a folder with one is whole."""
    from safetensors.torch import save

    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(os.path.join(folder, WEIGHTS_FILE), save(tensors, metadata={"format": fmt}))
    meta = {"format": fmt, "config": dict(config), **(extra or {})}
    atomic_write_text(os.path.join(folder, CONFIG_FILE), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def is_pretrained(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a :func:`save_pretrained` folder or the ``model.safetensors`` in one."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) or path.endswith(".safetensors")


def _load_pretrained(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = path if path.endswith(".safetensors") else os.path.join(folder, WEIGHTS_FILE)
    for f in (os.path.join(folder, CONFIG_FILE), weights):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"checkpoint file not found: {f}")
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            ckpt = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder}/{CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{folder}/{CONFIG_FILE}: expected a JSON object")
    try:
        ckpt["model"] = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    return ckpt


def load_checkpoint(path: str | os.PathLike, fmt: str) -> dict:
    """Read an exported checkpoint of format ``fmt``: a torch file with ``weights_only=True``, or a
    :func:`save_pretrained` folder (or its ``model.safetensors``).

    Raises FileNotFoundError when it is missing and ValueError (one line naming the file) when
    it is not a weights-only torch file, holds another format, or lacks ``config`` / ``model``.
    """
    path = os.fspath(path)
    if is_pretrained(path):
        return _check(_load_pretrained(path), path, fmt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and weights-only errors all mean "not a safe checkpoint"
        kind = "holds objects other than tensors" if "weights_only" in str(e).lower() or "Unsupported global" in str(e) \
            else f"is not a torch checkpoint ({type(e).__name__})"
        raise ValueError(f"{path}: not loadable with weights_only=True: it {kind}; refusing to load it") from None
    return _check(ckpt, path, fmt)


def _check(ckpt, path: str, fmt: str) -> dict:
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != fmt:
        if found in FORMAT_NAMES:
            raise ValueError(f"{path} is {FORMAT_NAMES[found]}, not {FORMAT_NAMES[fmt]}")
        if found is None:
            raise ValueError(f"{path}: not an enko-clip checkpoint (no key 'format'; expected {FORMAT_NAMES[fmt]})")
        raise ValueError(f"{path}: checkpoint format {found!r}, expected {fmt!r} (key 'format')")
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path}: key 'config' is missing or not a mapping")
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: key 'model' is missing or not a state dict of tensors")
    return ckpt
