"""Keep probabilities applied online: a curated crawl sampled afresh every epoch.

``python -m clip.curate`` (:mod:`clip.data.curation`) writes one file per shard into ``OUT/keep/``,
named after the shard's last two path parts (``OUT/keep/crawl/000001.keep.json`` for
``.../crawl/000001.tar``, local or ``pipe:``), or ``OUT/keep/records-000000.keep.json`` per slice of
a manifest. Each is ``{"format": FORMAT, "unit": name, "keys": [tar key, ...], "p": [probability,
...]}``. They live with the curation, not beside the shards, so the crawl can be read-only or
remote, and several curations of one crawl can coexist.

Each epoch a sample is kept when ``u < p``, ``u`` a uniform number that is a pure function of
(seed, epoch, key) (:func:`keep_draw`): a fresh subset every epoch, as MetaCLIP 2 curates in its
loader, and the same subset again for a run that is killed and resumed, whatever the order, the
workers or the ranks that read it. A sample missing from its keep file (the crawl grew since) is
kept with probability :attr:`CurationKeep.missing`. The image streams (:mod:`mae.images.stream`,
``data.curation``) apply it before partitioning, so a resumed epoch's positions are the same.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence

FORMAT = "enko-clip/keep-v1"
KEEP_DIR = "keep"


def keep_draw(p: float, seed: int, epoch: int, key: str) -> bool:
    """Whether the sample ``key`` is kept in ``epoch``: ``u < p`` with ``u`` uniform in [0, 1), a
    pure function of (seed, epoch, key)."""
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53 < p


def unit_name(url: str) -> str:
    """The keep-file name of a shard URL: its last two path parts without ``.tar``
    (``crawl/000001``), also for ``pipe:`` commands (the token naming the ``.tar``)."""
    path = next((t for t in reversed(url.split()) if ".tar" in t), url)
    parts = path.replace("\\", "/").rstrip("/").split("/")
    stem = parts[-1].split(".tar")[0]
    return f"{parts[-2]}/{stem}" if len(parts) > 1 and parts[-2] else stem


def keep_file(folder: str | os.PathLike, name: str) -> str:
    return os.path.join(os.fspath(folder), KEEP_DIR, f"{name}.keep.json")


def read_keep_file(path: str | os.PathLike) -> dict[str, float]:
    """``{key: probability}`` of one keep file; FileNotFoundError / ValueError (one line)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"keep file not found: {path} (was this source curated into that folder?)")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a keep file ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or len(obj.get("keys", ())) != len(obj.get("p", [0])):
        raise ValueError(f"{path}: not a keep file of format {FORMAT}")
    return dict(zip(obj["keys"], map(float, obj["p"])))


class CurationKeep:
    """The keep probabilities of one curation folder (``python -m clip.curate --out FOLDER``).

    Args:
        folder: the curation's output folder (config ``data.curation``).
        seed: the run's seed; the draw of a sample depends on (seed, epoch, key) only.
        missing: probability for a sample absent from its keep file.
    """

    def __init__(self, folder: str | os.PathLike, seed: int = 0, missing: float = 0.0):
        self.folder, self.seed, self.missing = os.fspath(folder), seed, missing
        if not os.path.isdir(os.path.join(self.folder, KEEP_DIR)):
            raise FileNotFoundError(f"data.curation: no {KEEP_DIR}/ folder in {self.folder} "
                                    "(run python -m clip.curate)")
        self._cache: dict[str, dict[str, float]] = {}

    def probabilities(self, url: str | None = None, records: bool = False) -> dict[str, float]:
        """``{key: p}`` for one shard URL, or for every record of a manifest (``records=True``)."""
        name = "records" if records else unit_name(url)
        if name not in self._cache:
            if records:
                probs: dict[str, float] = {}
                folder = os.path.join(self.folder, KEEP_DIR)
                for f in sorted(os.listdir(folder)):
                    if f.startswith("records-") and f.endswith(".keep.json"):
                        probs.update(read_keep_file(os.path.join(folder, f)))
                self._cache[name] = probs
            else:
                self._cache[name] = read_keep_file(keep_file(self.folder, name))
        return self._cache[name]

    def kept(self, probs: Mapping[str, float], key: str, epoch: int) -> bool:
        """The draw of ``key`` in ``epoch`` (:func:`keep_draw`)."""
        return keep_draw(probs.get(key, self.missing), self.seed, epoch, key)

    def expected_samples(self, urls: Sequence[str] | None = None) -> float:
        """Samples kept per epoch on average (the sum of the probabilities) over the shards ``urls``,
        or over the manifest records (``urls=None``): the curated epoch size."""
        if urls is None:
            return sum(self.probabilities(records=True).values())
        return sum(sum(self.probabilities(u).values()) for u in urls)
