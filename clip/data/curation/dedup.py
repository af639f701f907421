"""Duplicate images and captions: one copy kept (the first in source order), the rest counted.

Exact duplicates share their image bytes (a 64-bit BLAKE2b digest). Near duplicates (the same
picture resized, re-encoded at another JPEG quality) share a perceptual hash up to a small
Hamming distance: imagehash's DCT hash (``phash``, 64 bits) of the image as the models see it
(:func:`mae.images.decode.to_rgb`: transparency on white), JPEGs decoded at a reduced scale
(the hash looks at 32 x 32 grey pixels). Being grey, the hash cannot tell a red heart from a
blue one, so near duplicates must also agree on a colour code: the mean colour of each image
quarter, 5 bits a channel, within one step. The threshold trades copies missed against distinct
images merged; the default is chosen from both, measured on the bundled emoji and photos
(README, "From a crawl to a training set"). Candidate pairs come from multi-index hashing: split
into ``threshold + 1`` bands, two hashes within the threshold agree exactly on at least one
band; each candidate pair is then checked, and duplicate groups are the connected components of
the pairs found.

Captions: identical text in the same language after :func:`~clip.data.curation.metadata.normalize`
is kept on its first sample only; a sample left with no caption is dropped.

All of this holds the hashes of every sample in memory (about 40 bytes a sample with one caption): the
one part of curation whose memory grows with the samples.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np

PHASH_THRESHOLD = 6
COLOR_TOLERANCE = 1  # steps of the 5-bit colour code


def digest64(data: bytes) -> int:
    """A 64-bit BLAKE2b digest, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def image_signature(data: bytes) -> tuple[int, int]:
    """``(phash, colour code)`` of an encoded image as the models see it, two 64-bit integers
    (module docstring); raises for undecodable data."""
    import imagehash
    from PIL import Image

    from mae.images.decode import to_rgb

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (64, 64))  # JPEG: decode at 1/2 .. 1/8 scale, still >= 64 px
        img.load()
        rgb = to_rgb(img)
    bits = imagehash.phash(rgb).hash.reshape(-1)  # (64,) bool
    quarters = np.asarray(rgb.resize((2, 2), Image.BOX), dtype=np.uint64).reshape(-1) >> np.uint64(3)  # (12,) 5-bit
    colour = int((quarters << (np.arange(12, dtype=np.uint64) * np.uint64(5))).sum())
    return int(np.packbits(bits).view(">u8")[0]), colour


def colour_close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether the colour codes agree within :data:`COLOR_TOLERANCE` on all 12 channels."""
    ok = np.ones(len(a), dtype=bool)
    for k in range(12):
        shift, mask = np.uint64(5 * k), np.uint64(31)
        da = ((a >> shift) & mask).astype(np.int64) - ((b >> shift) & mask).astype(np.int64)
        ok &= np.abs(da) <= COLOR_TOLERANCE
    return ok


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)


def _candidate_pairs(h: np.ndarray, colour: np.ndarray, threshold: int) -> np.ndarray:
    """Pairs (i, j), i < j, of hashes within ``threshold`` bits and close colours (multi-index
    hashing)."""
    bands = threshold + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        sizes = np.diff(np.r_[starts, len(k)])
        for s, n in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = order[s : s + n]
            rows = max(1, (1 << 22) // n)  # a block of rows at a time: memory bounded in big buckets
            for r in range(0, n - 1, rows):
                i, j = np.nonzero(np.triu(np.ones((min(rows, n - r), n), dtype=bool), r + 1))
                a, b = members[i + r], members[j]
                close = (popcount64(h[a] ^ h[b]) <= threshold) & colour_close(colour[a], colour[b])
                found.append(np.stack([np.minimum(a, b)[close], np.maximum(a, b)[close]], 1))
    return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), dtype=np.int64)


def _first_of_group(n: int, pairs: np.ndarray) -> np.ndarray:
    """For each of ``n`` items, the smallest index in its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, label, np.arange(n))
    return first[label]


def duplicate_images(exact: np.ndarray, phash: np.ndarray | None = None, colour: np.ndarray | None = None,
                     has_phash: np.ndarray | None = None,
                     threshold: int = PHASH_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Which samples repeat an earlier one: ``(exact_dup, near_dup)`` boolean arrays over the
    samples in source order (the first of each group is in neither). ``exact == 0`` marks a
    sample without an image (never a duplicate); without ``phash`` only exact copies are found."""
    n = len(exact)
    present = exact != 0
    idx = np.flatnonzero(present)
    _, first = np.unique(exact[idx], return_inverse=True)
    first_idx = np.full(first.max() + 1 if len(first) else 0, n, dtype=np.int64)
    np.minimum.at(first_idx, first, idx)
    exact_dup = np.zeros(n, dtype=bool)
    exact_dup[idx] = first_idx[first] != idx
    near_dup = np.zeros(n, dtype=bool)
    if phash is not None and threshold >= 0:
        cand = np.flatnonzero(present & ~exact_dup & (has_phash if has_phash is not None else True))
        pairs = _candidate_pairs(phash[cand], colour[cand], threshold)
        near_dup[cand] = _first_of_group(len(cand), pairs) != np.arange(len(cand))
    return exact_dup, near_dup


def duplicate_captions(cap_hash: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Boolean over captions in source order: the same (language, text) hash appeared earlier
    among the ``alive`` captions."""
    dup = np.zeros(len(cap_hash), dtype=bool)
    idx = np.flatnonzero(alive)
    _, first = np.unique(cap_hash[idx], return_index=True)
    dup[idx] = True
    dup[idx[first]] = False
    return dup
