"""The shard format of both stages: WebDataset tars in img2dataset's layout, and ``stats.json``.

A shard folder holds ``%06d.tar`` files; a sample is the members sharing a key: the image
(``{key}.jpg|jpeg|png|webp``, the original bytes), optionally ``{key}.json`` (metadata; CLIP reads
its captions there) and ``{key}.txt`` (one caption). ``stats.json`` beside the shards records how
many samples each shard holds (``shards``, ``shard_samples``) and what the writer skipped; readers
take the epoch size from it. MAE reads the images only; ``clip.data.pairs`` adds the caption members.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mae.common.files import atomic_open, atomic_write_text

STATS_FILE = "stats.json"
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ----------------------------------------------------------------------------- reading
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "sftp://", "ftps://", "scp://")


def is_remote(url: str) -> bool:
    """A shard URL that is not a local file: ``pipe:CMD`` (whose stdout is the tar, e.g. ``pipe:aws
    s3 cp s3://bucket/000001.tar -``) or a URL webdataset's ``gopen`` opens (http via curl)."""
    return url.startswith(REMOTE_PREFIXES)


def expand_shards(source: str) -> list[str]:
    """Shard URLs for a brace pattern, a single ``.tar``, a folder of ``.tar`` (sorted), or several
    of these joined by ``::`` (open_clip's mixing syntax; concatenated in order). Local shards must
    exist; remote ones (:func:`is_remote`) are opened when read."""
    return [u for group in expand_shard_groups(source) for u in group]


def expand_shard_groups(source: str) -> list[list[str]]:
    """One list of shard URLs per ``::``-separated source (see :func:`expand_shards`)."""
    import braceexpand

    groups = []
    for part in source.split("::"):
        part = part.strip()
        if not is_remote(part) and os.path.isdir(part):
            shards = sorted(str(p) for p in Path(part).glob("*.tar"))
        else:
            shards = list(braceexpand.braceexpand(part))
        if not shards:
            raise ValueError(f"no .tar shards in {part}")
        missing = [s for s in shards if not is_remote(s) and not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(shards)} missing)")
        groups.append(shards)
    return groups


def looks_like_shards(source: str) -> bool:
    """Whether a source string names shards (pattern, ``.tar``, remote URL or a ``::`` mix)."""
    return "::" in source or "{" in source or source.endswith(".tar") or is_remote(source)


def iter_shard_samples(url: str) -> Iterator[dict]:
    """Samples of one tar shard as ``{"key", "image", "json", "txt"}`` (bytes, or None if absent).

    Members are grouped into samples by webdataset (``group_by_keys``: key = name up to the first
    dot of its basename). Remote or compressed shards are opened and read by webdataset too; a
    local plain tar is read by :func:`tar_members`: the same members as Python's ``tarfile`` gives,
    without its per-member overhead (README: benchmarks).
    Raises for a truncated or corrupt tar (the stream counts the shard as broken)."""
    from webdataset import tariterators

    if is_remote(url) or not _plain_tar(url):
        files = tariterators.tar_file_expander(tariterators.url_opener([{"url": url}]))
    else:
        files = tar_members(url)
    for s in tariterators.group_by_keys(files):
        image = next((s[e] for e in SHARD_IMAGE_EXTS if e in s), None)
        yield {"key": s["__key__"], "image": image, "json": s.get("json"), "txt": s.get("txt")}


_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names


def _plain_tar(path: str) -> bool:
    """A local file that starts like an uncompressed tar (ustar/GNU magic at offset 257)."""
    try:
        with open(path, "rb") as f:
            head = f.read(265)
    except OSError:
        return False
    return head[257:262] == b"ustar"


def tar_members(path: str) -> Iterator[dict]:
    """The regular files of a local uncompressed tar, in order, as webdataset's tar reader yields
    them (``{"fname", "data", "__url__"}``, then ``{}`` at the end): ustar and GNU headers, pax
    (``path``, ``size``) and GNU long names; links, folders and webdataset's ``__meta__`` names are
    skipped. Raises ``tarfile.ReadError`` for a truncated file or a header with a bad checksum."""
    import tarfile

    def field(b: bytes) -> str:
        return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")

    def number(b: bytes) -> int:
        if b[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
            return int.from_bytes(b[1:], "big")
        return int(b.split(b"\0", 1)[0].strip() or b"0", 8)

    with open(path, "rb", buffering=1 << 20) as f:
        override: dict[str, str] = {}
        while True:
            header = f.read(512)
            if len(header) < 512:
                if not header:
                    break  # no end-of-archive blocks: tolerated, as tarfile's stream mode does
                raise tarfile.ReadError(f"unexpected end of data in {path}")
            if header.count(0) == 512:
                break  # end of archive
            stored = number(header[148:156])  # the sum of the header bytes, its own field as spaces
            if stored != sum(header[:148]) + 256 + sum(header[156:]) and \
                    stored != sum(_signed(header[:148])) + 256 + sum(_signed(header[156:])):  # old writers
                raise tarfile.ReadError(f"bad tar header checksum in {path}")
            kind = header[156:157]
            name = field(header[:100])
            if header[257:263] == b"ustar\0" and header[345]:  # POSIX prefix
                name = field(header[345:500]) + "/" + name
            size = int(override.get("size", number(header[124:136])))
            data, pad = f.read(size), -size % 512
            if len(data) < size or len(f.read(pad)) < pad:  # the padding too, as tarfile checks
                raise tarfile.ReadError(f"unexpected end of data in {path}")
            if kind == b"x":  # pax header of the next member
                override = _pax(data)
                continue
            if kind == b"L":  # GNU long name of the next member
                override = {"path": field(data)}
                continue
            name, override = override.get("path", name), {}
            if kind not in (b"0", b"\0", b"7") or _SKIP_META.match(name):
                continue  # links, folders, global pax headers, metadata
            yield {"fname": name, "data": data, "__url__": path}
    yield {}


def _signed(b: bytes) -> list[int]:
    return [x - 256 if x > 127 else x for x in b]


def _pax(data: bytes) -> dict[str, str]:
    """``path`` and ``size`` of a pax extended header (records ``"LEN key=value\\n"``)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        if key in (b"path", b"size"):
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def shard_sample_count(urls: list[str]) -> int | None:
    """Samples in ``urls`` from the writers' statistics beside them (None if one is unknown): our
    ``stats.json`` (``shards``, ``shard_samples``), or img2dataset's per-shard ``{name}_stats.json``
    (``successes``). Remote shards are unknown (set ``data.num_samples``)."""
    total = 0
    for url in urls:
        if is_remote(url):
            return None
        folder, name = os.path.split(url)
        stats = Path(folder or ".", STATS_FILE)
        n = _folder_counts(str(stats), stats.stat().st_mtime_ns if stats.is_file() else 0).get(name)
        if n is None:
            try:  # img2dataset: 00000.tar + 00000_stats.json
                n = int(json.loads(Path(folder or ".", name[:-len(".tar")] + "_stats.json").read_text())["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        total += n
    return total


@functools.lru_cache(maxsize=64)
def _folder_counts(path: str, mtime_ns: int) -> dict[str, int]:
    """``{shard name: samples}`` of a ``stats.json`` ({} without one), read once per version of it."""
    try:
        stats = json.loads(Path(path).read_text())
        return dict(zip(stats["shards"], map(int, stats["shard_samples"])))
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ----------------------------------------------------------------------------- writing
def prepare_shard_folder(folder: Path, overwrite: bool = False) -> None:
    """Create ``folder``; existing ``.tar`` shards there are an error unless ``overwrite`` (then removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    old = list(folder.glob("*.tar"))
    if old and not overwrite:
        raise ValueError(f"{folder} already holds .tar shards (use --overwrite)")
    for p in old:
        p.unlink()


def write_shard_folder(records: Iterable[dict], folder: Path, shard_size: int,
                       members: Callable[[dict], dict | None] | None = None, stats: dict | None = None) -> dict:
    """Write the images of ``records`` (dicts with ``"path"``) as ``folder/%06d.tar`` shards.

    Tar keys are ``%09d`` running numbers. ``members(record)`` may add members to a sample (e.g.
    ``{"json": bytes, "txt": bytes}``) or return None to skip the record (the caller counts why).
    Undecodable images are skipped and counted (``skipped_corrupt``). Each shard is written
    atomically. ``stats`` (updated with ``samples``, ``skipped_corrupt``, ``shards``,
    ``shard_samples``, and whatever ``members`` counted in it) is written to ``folder/stats.json``
    and returned.
    """
    from webdataset import TarWriter

    from mae.images.decode import load_rgb  # the reader's decoder decides what counts as corrupt

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    stats = stats if stats is not None else {}
    stats.update(samples=0, skipped_corrupt=0)
    names, counts = [], []
    opened = writer = None

    def close():
        if writer is not None:
            writer.close()
            opened.__exit__(None, None, None)  # fsync + rename into place
            counts.append(count)

    count = 0
    try:
        for r in records:
            extra = members(r) if members is not None else {}
            if extra is None:
                continue
            data = Path(r["path"]).read_bytes()
            try:
                load_rgb(data)
            except Exception:  # PIL raises many types for bad data
                stats["skipped_corrupt"] += 1
                continue
            if writer is None or count == shard_size:
                close()
                names.append(f"{len(names):06d}.tar")
                opened = atomic_open(folder / names[-1], "wb")
                writer, count = TarWriter(opened.__enter__(), encoder=False, mtime=0), 0
            ext = Path(r["path"]).suffix.lower().lstrip(".")
            writer.write({"__key__": f"{stats['samples']:09d}", ext: data, **extra})
            count += 1
            stats["samples"] += 1
    except BaseException:
        if writer is not None:
            opened.__exit__(*sys.exc_info())  # the unfinished shard's temporary file is removed
        raise
    close()
    stats.update(shards=names, shard_samples=counts)
    atomic_write_text(folder / STATS_FILE, json.dumps(stats, indent=1, ensure_ascii=False))
    return stats
