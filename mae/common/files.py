"""Files that must never be left half-written, and weights-only checkpoints.

Every file the project writes for later use (exported checkpoints, the resolved config, shards,
``stats.json``, charts) goes through :func:`atomic_open`: a temporary file in the same folder,
flushed and fsynced, renamed over the target, then the folder fsynced, so a crash leaves either
the old file or the new one, never a torn one. A full disk or another I/O error while writing is
a :class:`WriteError`: one line naming the file (and, for a full disk, the bytes it needed), the
old file untouched.

A checkpoint of ours is ``{"format": TAG, "config": {...}, "model": state dict, ...}`` with the
tensors on the CPU, written by :func:`save_checkpoint` and read by :func:`load_checkpoint` with
``torch.load(weights_only=True)``: a file holding arbitrary pickled objects is refused, never
executed. The same content can be a folder (:func:`save_pretrained`): ``model.safetensors`` (no
pickle at all) and ``config.json``, the Hugging Face ``save_pretrained`` layout. What each TAG
means belongs to its owner (:mod:`mae.checkpoint`, :mod:`clip.model.checkpoint`), which names it
with :func:`register_format`. :func:`read_state_dict` reads other projects' weight files (timm,
open_clip, OpenAI layouts) the same safe way.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
PREFIX = "enko-clip/"  # every format tag of ours starts with it
_FORMAT_NAMES: dict[str, str] = {}


class WriteError(OSError):
    """A file could not be written (disk full, quota, permissions, I/O error); nothing half-written
    was left in its place. ``WriteError(errno, message)``; ``str()`` is the message alone."""

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, in order. Text is decoded
    with ``surrogateescape`` (invalid UTF-8 in a caption surfaces as a string that caption cleaning
    drops). FileNotFoundError for a missing file; ValueError naming file and line for a line that
    is not a JSON object."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="surrogateescape").strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, row


def register_format(tag: str, description: str) -> str:
    """Name a checkpoint format for error messages (e.g. ``"a CLIP checkpoint (clip_ckpt.pt)"``)."""
    _FORMAT_NAMES[tag] = description
    return tag


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
    over ``path``; on an exception it is removed and ``path`` is untouched. OS errors come out as
    :class:`WriteError` naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, _write_problem(e, path, tmp)) from None
        raise
    _fsync_dir(folder)


def _write_problem(e: OSError, path: str, tmp: str | None) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = ""
        if tmp is not None and os.path.exists(path):
            need = f" (the previous version is {os.path.getsize(path):,} bytes)"
        return f"cannot write {path}: {'no space left on the device' if e.errno == errno.ENOSPC else 'disk quota exceeded'}" \
               f" in {os.path.dirname(os.path.abspath(path))}{need}; free space and run again (the old file is intact)"
    return f"cannot write {path}: {e.strerror or e}"


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


def peek_format(path: str | os.PathLike) -> str | None:
    """The ``format`` tag of a checkpoint without loading its tensors (None when it has none: a bare
    state dict, another project's file); never raises for unreadable files (the load that follows
    reports them)."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            tag = json.loads(Path(path, CONFIG_FILE).read_text(encoding="utf-8")).get("format")
        elif path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                tag = (f.metadata() or {}).get("format")
            tag = tag if isinstance(tag, str) and tag.startswith(PREFIX) else None
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            tag = obj.get("format") if isinstance(obj, dict) else None
    except Exception:  # noqa: BLE001 - any unreadable file: no tag
        return None
    return tag if isinstance(tag, str) else None


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


def _torch_load(path: str, **kw) -> Any:
    """``torch.load(weights_only=True)``; a file it refuses is one ValueError naming why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:  # zip, pickle and weights-only errors all mean "not a safe checkpoint"
        text = str(e)
        if "constants.pkl" in text or "TorchScript" in text or "RecursiveScriptModule" in text:
            raise ValueError(f"{path} is a TorchScript archive (OpenAI's original release), which cannot be read "
                             "without running its code; convert it once with open_clip: torch.save(open_clip."
                             "create_model('ViT-B-32-quickgelu', pretrained='openai').state_dict(), "
                             "'vit_b32_openai.pt')") from None
        kind = "holds objects other than tensors" if "weights_only" in text.lower() or "Unsupported global" in text \
            else f"is not a torch checkpoint ({type(e).__name__})"
        raise ValueError(f"{path}: not loadable with weights_only=True: it {kind}; refusing to load it") from None


def load_checkpoint(path: str | os.PathLike, fmt: str) -> dict:
    """Read a checkpoint of format ``fmt``: a torch file with ``weights_only=True``, or a
    :func:`save_pretrained` folder (or its ``model.safetensors``).

    Raises FileNotFoundError when it is missing and ValueError (one line naming the file) when
    it is not a weights-only torch file, holds another format, or lacks ``config`` / ``model``.
    """
    path = os.fspath(path)
    if is_pretrained(path):
        return _check(_load_pretrained(path), path, fmt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _check(_torch_load(path), path, fmt)


def _check(ckpt, path: str, fmt: str) -> dict:
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != fmt:
        if found in _FORMAT_NAMES:
            raise ValueError(f"{path} is {_FORMAT_NAMES[found]}, not {_FORMAT_NAMES.get(fmt, fmt)}")
        if found is None:
            raise ValueError(f"{path}: not an enko-clip checkpoint (no key 'format'; expected "
                             f"{_FORMAT_NAMES.get(fmt, fmt)})")
        raise ValueError(f"{path}: checkpoint format {found!r}, expected {fmt!r} (key 'format')")
    if not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"{path}: key 'config' is missing or not a mapping")
    state = ckpt.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: key 'model' is missing or not a state dict of tensors")
    return ckpt


_WRAPPERS = ("state_dict", "model", "module")  # where training scripts nest a state dict
_PREFIXES = ("module.", "model.")  # DDP and wrapper modules


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from another project's weights: a safetensors file, or a weights-only
    torch file holding a state dict, possibly nested (``{"state_dict": ...}`` as open_clip's training
    checkpoints, ``model``, ``module``) and prefixed (``module.``, ``model.``). Never unpickles code;
    FileNotFoundError / ValueError in one line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # a torn or foreign file
            raise ValueError(f"{path}: not a safetensors file ({type(e).__name__})") from None
    obj = _torch_load(path, mmap=True)
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and "format" not in obj:
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not obj:
        raise ValueError(f"{path}: not a state dict of tensors")
    for pre in _PREFIXES:
        if all(k.startswith(pre) for k in obj):
            obj = {k[len(pre):]: v for k, v in obj.items()}
    return obj
