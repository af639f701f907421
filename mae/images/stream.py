"""The partitioned image stream of both stages over a source of :mod:`mae.images.sources`.

Sharding. Global part ``g = rank * W + worker_id`` of ``P = world_size * W`` parts (W DataLoader
workers, found with ``get_worker_info()``).
  * Files / rows: the list is permuted with a generator seeded by ``seed + epoch`` (the same on
    every rank), then part g takes items ``g, g+P, g+2P, ...``.
  * Shards: the shard list is permuted the same way. If there are at least P shards, part g reads
    shards ``g, g+P, ...``; otherwise every part reads every shard and keeps the samples whose
    position in the (permuted) stream is ``g mod P`` (round robin; each part still reads all the
    bytes, which is fine for the small data sets where this happens). Samples then pass a small
    in-worker shuffle buffer (seeded by ``seed``, ``epoch`` and g).
Either way one pass over all parts visits every sample exactly once.
  * Resampled (``resampled=True``, open_clip's ``--dataset-resampled``): each part draws shards
    with replacement (weighted per shard by its ``::`` source's weight, as open_clip's upsampling
    factors), from a generator seeded by (seed, epoch, part): an endless stream whose "epoch" is
    the nominal ``num_samples``; resuming replays the part's draws without decoding. ``set_epoch(e)`` reshuffles;
call it before building the epoch's iterator, with ``persistent_workers=False`` (the default) so
the workers see it. All ranks must use the same ``num_workers``. Parts differ by at most one file
(or one shard), so ranks may see slightly different sample counts: under DeepSpeed run a fixed
number of steps per epoch (``num_samples() // global_batch``) instead of exhausting the loader.

Bad data never crashes a worker: an undecodable, truncated, zero-byte or missing image, or a
shard sample without an image, is skipped and counted; a shard that breaks off counts the samples
it lost (from its ``stats.json``; one when that is unknown) and itself as a broken shard. Each
yield carries ``n_skipped``: the skips since this worker's previous yield; the worker's last
sample also carries its trailing skips. So with ``drop_last=False`` the sum of ``n_skipped`` over
an epoch is the exact skip count (only a part that decodes no image at all loses its count).
Nothing is logged from workers; the trainer sums and logs.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mae.images.keep import CurationKeep
from mae.images.sources import resolve_source
from mae.images.shards import expand_shard_groups, iter_shard_samples, shard_sample_count


def sample_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (seed, epoch, part, position)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def check_stream(kind: str, source, resampled: bool, weights: Sequence[float]) -> None:
    """ValueError (one line) for stream settings a source cannot take: resampling draws shards, and
    source weights weigh those draws, one per ``::``-separated shard source."""
    if resampled and kind != "shards":
        raise ValueError("data.resampled=true draws shards with replacement: the source must be WebDataset shards")
    if weights:
        if not resampled:
            raise ValueError("data.source_weights weigh shard draws: they need resampling (data.resampled=true)")
        n = len(expand_shard_groups(str(source)))
        if len(weights) != n:
            raise ValueError(f"data.source_weights has {len(weights)} weights for {n} '::'-separated shard sources")


class ShardedImageSource(IterableDataset):
    """Partitioned, reshuffled, skip-counting stream over a source (see the module docstring).

    Every yielded item is a dict: what the subclass's ``load(record)`` returned (None = skip the
    record) plus ``n_skipped`` (records skipped since the previous item), ``n_broken_shards``,
    ``worker`` (the virtual worker id) and ``pos`` (records of this part consumed through this
    item). ``load`` runs under a torch random state seeded by (seed, epoch, part, record index), so
    a record's augmentation does not depend on what came before it. ``set_epoch(e, start, first)``
    resumes mid-epoch: virtual worker ``v`` skips its first ``start[v]`` records without decoding
    them, and DataLoader worker ``w`` plays virtual worker ``(w + first) % W``, so the batch order of
    an interrupted epoch continues exactly.
    """

    def __init__(self, source, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 256, resampled: bool = False,
                 weights: Sequence[float] = (), num_samples: int = 0, curation: str = ""):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.kind, self.items = resolve_source(source)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.resampled, self.nominal = resampled, num_samples
        check_stream(self.kind, source, resampled, weights)
        self.weights = None
        if weights:
            groups = expand_shard_groups(str(source))
            self.weights = [float(w) for w, g in zip(weights, groups) for _ in g]  # open_clip: per shard
        self.keep = CurationKeep(curation, seed) if curation else None
        self.set_epoch(0)

    def num_samples(self) -> int | None:
        """Samples per (nominal) epoch over all ranks before skips: ``num_samples`` if given, else
        the records, or for shards the writers' statistics (our ``stats.json`` or img2dataset's
        ``*_stats.json``, :func:`mae.images.shards.shard_sample_count`); None when unknown."""
        if self.nominal:
            return self.nominal
        if self.keep is not None:  # a curated source: the expected number kept
            return round(self.keep.expected_samples(None if self.kind == "records" else self.items))
        return len(self.items) if self.kind == "records" else shard_sample_count(self.items)

    def set_epoch(self, epoch: int, start: dict[int, int] | None = None, first_worker: int = 0) -> None:
        """Reshuffle for ``epoch``; ``start`` and ``first_worker`` resume inside it (class docstring)."""
        self.epoch, self.start, self.first_worker = epoch, dict(start or {}), first_worker

    def _order(self) -> list:
        if not self.shuffle:
            return list(self.items)
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # identical on all ranks
        return [self.items[i] for i in torch.randperm(len(self.items), generator=g).tolist()]

    def _place(self) -> tuple[int, int]:
        """(virtual worker id, number of workers) of the calling process."""
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return (wid + self.first_worker) % workers, workers

    def records(self) -> Iterator[dict]:
        """This (rank, worker)'s raw records for the current epoch, before decoding."""
        vid, workers = self._place()
        parts, part = self.world_size * workers, self.rank * workers + vid
        if self.resampled:  # epoch-free: shards drawn with replacement, a stream per (epoch, part)
            rng = random.Random(f"{self.seed}:{self.epoch}:{part}:resampled")
            stream = self._read_shards(rng.choices(self.items, self.weights)[0] for _ in itertools.count())
        else:
            order = self._order()
            if self.kind == "records":
                if self.keep is not None:  # before the partition: every rank and worker sees the same kept list
                    probs = self.keep.probabilities(records=True)
                    order = [r for r in order if self.keep.kept(probs, r["key"], self.epoch)]
                yield from order[part::parts]
                return
            if len(order) >= parts:
                stream = self._read_shards(order[part::parts])
            else:
                stream = (s for i, s in enumerate(self._read_shards(order)) if i % parts == part)
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from stream
            return
        rng = random.Random(f"{self.seed}:{self.epoch}:{part}")
        buf: list = []
        for s in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = s
        rng.shuffle(buf)
        yield from buf

    def _read_shards(self, urls: Iterable[str]) -> Iterator[dict]:
        """Samples of the shards in turn. A shard that cannot be read to its end, or that ends before
        the count its writer recorded (``stats.json``, img2dataset's ``*_stats.json``: a copy cut at a
        member boundary reads as a whole tar), yields one broken record standing for the samples it
        lost: that count minus those read (1 for a shard that breaks and has no count; a shard with
        no count that ends early cannot be told from a whole one). With a curation
        (``data.curation``) only the samples its keep draw keeps this epoch are yielded."""
        for url in urls:
            read, broken = 0, False
            probs = self.keep.probabilities(url) if self.keep is not None else None
            try:
                for sample in iter_shard_samples(url):
                    read += 1
                    if probs is None or self.keep.kept(probs, sample["key"], self.epoch):
                        yield sample
            except Exception:  # unreadable or truncated tar: count what it lost, go on with the next
                broken = True
            known = shard_sample_count([url])
            if broken or (known is not None and read < known):
                yield {"key": url, "image": None, "json": None, "txt": None, "broken_shard": True,
                       "lost": max(1, known - read) if known is not None else 1}

    def load(self, record: dict) -> dict | None:
        raise NotImplementedError

    @staticmethod
    def encoded(record: dict):
        """The record's image as stored: a path or the shard member's bytes (None when absent)."""
        return record.get("image") if "path" not in record else record["path"]

    def decode(self, record: dict, views):
        """``views(path or bytes)`` of the record's image (a view maker of :mod:`mae.images.views`, or
        :class:`mae.images.decode.Decoded`), None when it is missing or cannot be decoded."""
        src = self.encoded(record)
        if src is None:
            return None
        try:
            return views(src)
        except Exception:  # PIL and libjpeg raise many types for bad data (OSError, SyntaxError, ValueError, ...)
            return None

    def __iter__(self):
        vid, workers = self._place()
        part = self.rank * workers + vid
        skip = self.start.get(vid, 0)
        # Hold one good item back so that trailing skips ride on the part's last yield.
        pending, skipped, broken = None, 0, 0
        for i, record in enumerate(self.records()):
            if i < skip:
                continue
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding
                # and format a stack trace for it, at every sample
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, part, i))
                item = self.load(record)
            if item is None:
                skipped += record.get("lost", 1)
                broken += bool(record.get("broken_shard"))
                continue
            if pending is not None:
                yield pending
            pending = {**item, "n_skipped": skipped, "n_broken_shards": broken, "worker": vid, "pos": i + 1}
            skipped = broken = 0
        if pending is not None:
            pending["n_skipped"] += skipped
            pending["n_broken_shards"] += broken
            yield pending


class ImageDataset(ShardedImageSource):
    """Yields ``{"image": views(encoded image), "n_skipped", "n_broken_shards", "worker", "pos"}``.

    Args:
        source: image folder, ``.jsonl`` / ``.csv`` manifest, list of manifest rows, or WebDataset
            shards (:func:`mae.images.sources.resolve_source`).
        views: encoded image -> sample (a view maker of :mod:`mae.images.views`, or
            :class:`mae.images.decode.Decoded` around a transform of decoded images).
        rank, world_size, seed, shuffle, shuffle_buffer, resampled, weights, num_samples: the stream
            (:class:`ShardedImageSource`).
    """

    def __init__(self, source, views, **kw):
        super().__init__(source, **kw)
        self.views = views

    def load(self, record):
        img = self.decode(record, self.views)
        return None if img is None else {"image": img}


def batch_position(samples: list[dict]) -> dict:
    """The bookkeeping fields of a batch of stream items (skip counts and where the batch ended)."""
    return {"n_skipped": sum(int(s.get("n_skipped", 0)) for s in samples),
            "n_broken_shards": sum(int(s.get("n_broken_shards", 0)) for s in samples),
            "worker": samples[-1].get("worker"), "pos": samples[-1].get("pos"), "size": len(samples)}


class ImageCollate:
    """A batch of :class:`ImageDataset` items: ``{"images": views.collate(...), "n_skipped",
    "n_broken_shards", "worker", "pos", "size"}`` (counts summed, ``worker``/``pos`` of the last item)."""

    def __init__(self, views):
        self.views = views

    def __call__(self, samples: list[dict]) -> dict:
        return {"images": self.views.collate([s["image"] for s in samples]), **batch_position(samples)}
