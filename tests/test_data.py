"""Data loading: sources, sharding over ranks x workers, skips, captions, collate, split, writer."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from clip.data.pairs import CaptionCollate, PairDataset, split_rows
from clip.data.shards import write_shards
from clip.shards import main as data_main
from mae.images.decode import load_rgb
from mae.images.sources import iter_manifest
from mae.images.decode import Decoded
from mae.images.transforms import random_crop
from mae.images.stream import ImageDataset


# ----------------------------------------------------------------------------- helpers
def build_image_dataset(source, transform, **kw):  # a transform of decoded images, as the tests write them
    return ImageDataset(source, Decoded(transform), **kw)


def build_pair_dataset(source, transform, **kw):
    return PairDataset(source, Decoded(transform), **kw)


def mae_transform(size: int):  # the MAE stage's reference view
    return random_crop(size, (0.2, 1.0))


def fingerprint(img: Image.Image) -> torch.Tensor:
    """A transform that identifies the decoded image (so image-only streams can be checked)."""
    return torch.tensor(int.from_bytes(hashlib.md5(img.tobytes()).digest()[:7], "big"))


def nothing(img: Image.Image) -> torch.Tensor:
    return torch.zeros(1)


def worker_id(img: Image.Image) -> torch.Tensor:
    info = get_worker_info()
    return torch.tensor(info.id if info is not None else -1)


def as_list(batch):
    return batch


def collect(ds, workers: int = 0) -> list:
    if workers == 0:
        return list(ds)
    loader = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=as_list)
    return [s for batch in loader for s in batch]


@pytest.fixture(scope="module")
def manifest(data_dir) -> Path:
    return data_dir / "emoji" / "captions.jsonl"


@pytest.fixture(scope="module")
def rows(manifest) -> list[dict]:
    return list(iter_manifest(manifest))


@pytest.fixture(scope="module")
def subset(rows) -> list[dict]:
    return rows[::40]  # 40 rows from all groups


@pytest.fixture(scope="module")
def shard_dir(subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(subset, out, shard_size=7)  # 6 shards: 5 x 7 + 5
    return out


@pytest.fixture(scope="module")
def image_folder(rows, tmp_path_factory) -> Path:
    """12 good emoji in nested folders, plus a non-image file that must be ignored."""
    root = tmp_path_factory.mktemp("folder")
    for i, row in enumerate(rows[:12]):
        sub = root / f"d{i % 3}" / ("e" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["path"], sub / Path(row["file"]).name.replace(".png", ".PNG" if i == 5 else ".png"))
    (root / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- images
def test_load_rgb_flattens_transparency_onto_white(data_dir):
    path = data_dir / "emoji" / "img" / "1f947.png"
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (136, 128)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert len(img.getcolors(10_000)) > 10  # the medal itself is not flattened away
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((4, 4), (200, 10, 10, 255))
    rgba.putpixel((5, 5), (0, 0, 0, 128))  # half transparent black over white
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    flat = load_rgb(buf.getvalue())
    assert flat.getpixel((0, 0)) == (255, 255, 255) and flat.getpixel((4, 4)) == (200, 10, 10)
    assert abs(flat.getpixel((5, 5))[0] - 127) <= 1
    t = mae_transform(32)(img)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32


def test_sources_yield_all_samples_with_right_content(manifest, rows, subset, shard_dir, image_folder):
    folder = [fingerprint(load_rgb(r["path"])).item() for r in rows[:12]]
    got = [s['image'].item() for s in build_image_dataset(str(image_folder), fingerprint)]
    assert sorted(got) == sorted(folder)

    full = build_image_dataset(str(manifest), nothing)
    assert full.num_samples() == 1598 and sum(1 for _ in full) == 1598

    want = sorted(fingerprint(load_rgb(r["path"])).item() for r in subset)
    shards = sorted(shard_dir.glob("*.tar"))
    assert len(shards) == 6
    for source in (str(shard_dir), str(shard_dir / "{000000..000005}.tar")):
        got = [s['image'].item() for s in build_image_dataset(source, fingerprint)]
        assert sorted(got) == want
    single = [s['image'].item() for s in build_image_dataset(str(shards[-1]), fingerprint)]
    assert len(single) == 5
    assert build_image_dataset(str(shard_dir), nothing).num_samples() == 40  # from the writer's stats.json
    assert build_image_dataset(str(shard_dir / "{000000..000002}.tar"), nothing).num_samples() == 21

    imgs = [s['image'] for s in build_image_dataset(str(image_folder), mae_transform(48))]
    assert len(imgs) == 12 and all(t.shape == (3, 48, 48) for t in imgs)


@pytest.mark.parametrize("source", ["manifest", "shards", "few_shards", "pipe", "mixed"])
def test_epoch_covers_every_sample_once_over_2_ranks_x_2_workers(source, subset, shard_dir):
    src = {"manifest": subset, "shards": str(shard_dir),  # 6 shards >= 4 parts: split shards
           "few_shards": str(shard_dir / "{000000..000002}.tar"),  # 3 < 4: round robin
           "pipe": f"pipe:cat {shard_dir}/{{000000..000005}}.tar",  # as 'pipe:aws s3 cp s3://... -'
           "mixed": f"{shard_dir}/{{000000..000002}}.tar::pipe:cat {shard_dir}/{{000003..000005}}.tar"}[source]
    expected = [r["key"] for r in subset] if source != "few_shards" else [r["key"] for r in subset[:21]]
    parts = []
    for rank in range(2):
        ds = build_pair_dataset(src, worker_id, rank=rank, world_size=2, seed=3)
        ds.set_epoch(1)
        by_worker: dict[int, list] = {}
        for s in collect(ds, workers=2):
            by_worker.setdefault(s["image"].item(), []).append(s["key"])
        assert sorted(by_worker) == [0, 1]
        parts += list(by_worker.values())
    assert len(parts) == 4 and all(parts)
    union = [k for p in parts for k in p]
    assert sorted(union) == sorted(expected)  # all samples, none twice
    for i in range(4):
        for j in range(i + 1, 4):
            assert not set(parts[i]) & set(parts[j])


def test_folder_epoch_coverage_with_workers(image_folder, rows):
    want = sorted(fingerprint(load_rgb(r["path"])).item() for r in rows[:12])
    got = []
    for rank in range(2):
        got += [s['image'].item() for s in collect(build_image_dataset(str(image_folder), fingerprint, rank=rank,
                                                                 world_size=2), workers=2)]
    assert sorted(got) == want


@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_set_epoch_reshuffles_deterministically(source, subset, shard_dir):
    src = subset if source == "manifest" else str(shard_dir)
    ds = build_pair_dataset(src, nothing, seed=0)
    order = {}
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        keys = [s["key"] for s in ds]
        if epoch in order:
            assert keys == order[epoch]
        order[epoch] = keys
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1]) == sorted(r["key"] for r in subset)
    plain = [s["key"] for s in build_pair_dataset(src, nothing, shuffle=False)]
    plain2 = [s["key"] for s in build_pair_dataset(src, nothing, shuffle=False)]
    assert plain == plain2 and plain != order[0]


# ----------------------------------------------------------------------------- bad data
@pytest.fixture(scope="module")
def bad_folder(rows, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    good = [Path(r["path"]) for r in rows[:6]]
    for p in good:
        shutil.copy(p, root / p.name)
    data = good[0].read_bytes()
    (root / "zero.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (root / "text.webp").write_bytes(b"RIFF....WEBPVP8 nope")
    return root


def test_corrupt_images_are_skipped_and_counted(bad_folder):
    for workers, world in ((0, 1), (2, 1), (2, 2)):
        got = []
        for rank in range(world):
            got += collect(build_image_dataset(str(bad_folder), mae_transform(32), rank=rank,
                                               world_size=world, seed=1), workers)
        assert len(got) == 6
        assert sum(s['n_skipped'] for s in got) == 4


def test_bad_samples_in_manifest_and_shards_are_skipped(bad_folder, rows, tmp_path):
    from webdataset import TarWriter

    m = tmp_path / "m.jsonl"
    lines = [{"file": str(bad_folder / n), "en": "x"} for n in ("zero.png", "truncated.png", "missing.png")]
    lines += [{"file": r["path"], "en": r["en"]} for r in rows[:3]]
    m.write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = list(build_pair_dataset(str(m), nothing))
    assert len(got) == 3 and sum(s["n_skipped"] for s in got) == 3

    good = Path(rows[0]["path"]).read_bytes()
    with open(tmp_path / "000000.tar", "wb") as f:
        w = TarWriter(f, encoder=False)
        w.write({"__key__": "a", "png": good, "txt": b"good one"})
        w.write({"__key__": "b", "png": good[:200], "txt": b"truncated"})
        w.write({"__key__": "c", "json": b'{"captions": {"en": ["no image"]}}'})
        w.write({"__key__": "d", "jpg": b"", "txt": b"zero bytes"})
        w.write({"__key__": "e", "webp": good, "txt": b"a png named webp decodes fine"})
        w.close()
    (tmp_path / "000001.tar").write_bytes(b"this is not a tar file at all" * 40)
    got = list(build_pair_dataset(str(tmp_path / "{000000..000001}.tar"), nothing, shuffle=False))
    assert [s["key"] for s in got] == ["a", "e"]
    assert build_pair_dataset(str(tmp_path / "000000.tar"), nothing).num_samples() is None  # no stats.json
    assert sum(s["n_skipped"] for s in got) == 4  # b, c, d and the unreadable shard


def test_invalid_captions_are_dropped_and_counted(rows, tmp_path):
    from webdataset import TarWriter

    img = rows[0]["path"]
    m = tmp_path / "m.jsonl"
    with open(m, "wb") as f:
        f.write(json.dumps({"key": "a", "file": img, "en": "  ", "ko": "고양이"}).encode() + b"\n")
        b = {"key": "b", "file": img, "captions": {"en": ["a cat", "", "\t"], "ko": []}}
        f.write(json.dumps(b).encode() + b"\n")
        f.write(json.dumps({"key": "c", "file": img, "en": "", "ko": " "}).encode() + b"\n")
        f.write(b'{"key": "d", "file": "' + img.encode() + b'", "en": "bad \xff\xfe", "ko": "ok"}\n')
        f.write(json.dumps({"key": "e", "file": img, "en": ["dog", "\udc80"], "ja": "inu"}).encode() + b"\n")
    got = {s["key"]: s for s in build_pair_dataset(str(m), nothing, shuffle=False)}
    assert {k: s["captions"] for k, s in got.items()} == {
        "a": {"ko": ["고양이"]}, "b": {"en": ["a cat"]}, "d": {"ko": ["ok"]}, "e": {"en": ["dog"]}}
    assert {k: s["n_dropped"] for k, s in got.items()} == {"a": 1, "b": 2, "d": 1, "e": 1}
    assert sum(s["n_skipped"] for s in got.values()) == 1  # c

    png = Path(img).read_bytes()
    with open(tmp_path / "s.tar", "wb") as f:
        w = TarWriter(f, encoder=False)
        w.write({"__key__": "t1", "png": png, "txt": b"\xff\xfe\xfd"})  # non-UTF-8 only caption
        w.write({"__key__": "t2", "png": png, "txt": b"   "})
        w.write({"__key__": "t3", "png": png, "txt": b" plain caption "})
        cut = b'{"captions": {"ko": ["\xea\xb0"]}}'  # a Hangul syllable cut short: invalid UTF-8
        w.write({"__key__": "t4", "png": png, "json": cut, "txt": b"en text"})
        w.close()
    got = list(build_pair_dataset(str(tmp_path / "s.tar"), nothing, shuffle=False))
    assert [(s["key"], s["captions"], s["n_dropped"]) for s in got] == [
        ("t3", {"en": ["plain caption"]}, 0), ("t4", {"en": ["en text"]}, 1)]
    assert sum(s["n_skipped"] for s in got) == 2


# ----------------------------------------------------------------------------- captions, writer
def test_captions_round_trip_through_written_shards(subset, shard_dir):
    from webdataset import tariterators

    direct = {s["key"]: s["captions"] for s in build_pair_dataset(subset, nothing)}
    via = {s["key"]: s["captions"] for s in build_pair_dataset(str(shard_dir), nothing)}
    assert len(direct) == 40 and direct == via
    assert direct[subset[0]["key"]] == {"en": [subset[0]["en"]], "ko": [subset[0]["ko"]]}
    sample = next(iter(tariterators.tarfile_samples([{"url": str(shard_dir / "000000.tar")}])))
    meta = json.loads(sample["json"])
    row = subset[0]
    assert sample["png"] == Path(row["path"]).read_bytes()
    assert meta["captions"] == {"en": [row["en"]], "ko": [row["ko"]]}
    fields = ("key", "group", "subgroup", "base")
    assert {k: meta[k] for k in fields} == {k: row[k] for k in fields}
    assert "path" not in meta and "en" not in meta and sample["txt"].decode() == row["en"]
    stats = json.loads((shard_dir / "stats.json").read_text())
    assert stats["samples"] == 40 and len(stats["shards"]) == 6 and stats["shard_samples"] == [7] * 5 + [5]


def test_write_shards_image_folder_and_errors(image_folder, rows, tmp_path, capsys):
    stats = write_shards(str(image_folder), tmp_path / "mae", shard_size=5)
    assert stats["all"]["samples"] == 12
    assert stats["all"]["shards"] == ["000000.tar", "000001.tar", "000002.tar"]
    assert not list((tmp_path / "mae").glob("*.tmp"))
    got = [s['image'].item() for s in build_image_dataset(str(tmp_path / "mae"), fingerprint)]
    assert sorted(got) == sorted(fingerprint(load_rgb(r["path"])).item() for r in rows[:12])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "a.png"}\n{"file": oops}\n')
    missing_img = tmp_path / "missing.jsonl"
    missing_img.write_text('{"file": "nowhere.png", "en": "x"}\n')
    cases = [
        (["--manifest", str(tmp_path / "none.jsonl")], "manifest not found"),
        (["--manifest", str(bad)], "bad.jsonl:2: bad JSON"),
        (["--manifest", str(missing_img)], "image not found"),
        (["--images", str(image_folder)], "already holds .tar shards"),
    ]
    for args, msg in cases:
        out = str(tmp_path / "mae") if "--images" in args else str(tmp_path / "x")
        assert data_main([*args, "--out", out]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_write_shards_cli_with_split(manifest, rows, tmp_path, repo_root):
    proc = subprocess.run(
        [sys.executable, "-m", "clip.shards", "--manifest", str(manifest),
         "--out", str(tmp_path),
         "--shard-size", "500", "--val-fraction", "0.15", "--split-key", "base"],
        capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())["splits"]
    assert stats["train"]["samples"] + stats["val"]["samples"] == 1598
    assert 0.10 < stats["val"]["samples"] / 1598 < 0.20
    train_rows, val_rows = split_rows(rows, 0.15, "base")
    assert stats["val"]["samples"] == len(val_rows)
    val_keys = {s["key"] for s in build_pair_dataset(str(tmp_path / "val"), nothing)}
    assert val_keys == {r["key"] for r in val_rows}
    assert len(list((tmp_path / "train").glob("*.tar"))) == len(stats["train"]["shards"]) == 3


# ----------------------------------------------------------------------------- split
def test_split_rows_is_deterministic_and_disjoint_by_key(rows):
    fake = [{"key": f"{r['key']}-{t}", "base": r["base"]} for r in rows[:300] for t in range(3)]  # 3 per base
    train, val = split_rows(fake, 0.2, seed=0)
    assert (train, val) == split_rows(fake, 0.2, seed=0)
    assert len(train) + len(val) == len(fake) and len(val) % 3 == 0
    assert not {r["base"] for r in train} & {r["base"] for r in val}
    assert 0.1 < len(val) / len(fake) < 0.3
    assert split_rows(fake, 0.2, seed=1)[1] != val
    assert split_rows(fake, 0.0)[1] == [] and split_rows(fake, 1.0)[0] == []
    with pytest.raises(ValueError, match="nope"):
        split_rows(fake, 0.2, key_field="nope")


# ----------------------------------------------------------------------------- collate
@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from tokenizer import BilingualTokenizer

    return BilingualTokenizer.from_dir(str(tiny_tokenizer_dir))


def two_crops(img):
    return [torch.ones(3, 8, 8), torch.zeros(3, 4, 4)]


def test_collate_all_languages(tokenizer):
    tok = tokenizer
    caps = [{"en": ["red apple"], "ko": ["빨간 사과"]}, {"ko": ["고양이", "새끼 고양이"]}, {"en": ["dog", "a dog", "puppy"]}]
    samples = [{"image": two_crops(None), "captions": c, "key": k, "n_skipped": sk, "n_dropped": dr}
               for c, k, sk, dr in zip(caps, "abc", (1, 0, 2), (0, 2, 0))]
    batch = CaptionCollate(tok, languages=("en", "ko"), mode="all", seed=0)(samples)
    T = tok.context_length
    assert [im.shape for im in batch["images"]] == [(3, 3, 8, 8), (3, 3, 4, 4)]
    assert batch["tokens"].shape == (3, 2, T) and batch["tokens"].dtype == torch.long
    assert batch["text_mask"].tolist() == [[True, True], [False, True], [True, False]]
    assert batch["languages"] == ["en", "ko"] and batch["keys"] == ["a", "b", "c"]
    assert batch["n_skipped"] == 3 and batch["n_dropped"] == 2
    assert torch.equal(batch["tokens"][0], tok.encode_batch(["red apple", "빨간 사과"]))
    empty = [tok.sot_id, tok.eot_id] + [tok.pad_id] * (T - 2)
    assert batch["tokens"][1, 0].tolist() == empty and batch["tokens"][2, 1].tolist() == empty
    assert tok.decode(batch["tokens"][2, 0].tolist()).strip() in ("dog", "a dog", "puppy")


def test_collate_sample_mode_and_determinism(tokenizer):
    samples = [{"image": torch.zeros(3, 8, 8), "key": str(i), "n_skipped": 0,
                "captions": {"en": [f"dog {i}", f"cat {i}"], "ko": [f"개 {i}"]}} for i in range(16)]
    collate = CaptionCollate(tokenizer, languages=("en", "ko"), mode="sample", seed=5)
    batch = collate(samples)
    assert [im.shape for im in batch["images"]] == [(16, 3, 8, 8)]
    assert batch["tokens"].shape == (16, 1, tokenizer.context_length)
    assert batch["text_mask"].all() and batch["languages"] == ["mixed"]
    langs = Counter(row[0] for row in batch["slot_languages"])
    assert set(langs) == {"en", "ko"}  # mixed batch (16 draws: both appear for this seed)
    again = CaptionCollate(tokenizer, languages=("en", "ko"), mode="sample", seed=5)(samples)
    assert torch.equal(again["tokens"], batch["tokens"])
    assert not torch.equal(collate(samples)["tokens"], batch["tokens"])  # next call, next draws
    with pytest.raises(ValueError, match="mode"):
        CaptionCollate(tokenizer, languages=("en",), mode="one")


def test_pair_loader_end_to_end(subset, shard_dir, tokenizer):
    ds = build_pair_dataset(str(shard_dir), mae_transform(32), languages=("en", "ko"))
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=CaptionCollate(tokenizer, languages=("en", "ko")))
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == 40
    assert all(b["text_mask"].all() for b in batches)
    assert batches[0]["images"][0].shape == (8, 3, 32, 32)


def test_truncated_shard_counts_the_samples_it_lost(subset, tmp_path):
    write_shards(subset, tmp_path, shard_size=7)  # 6 shards, stats.json: 5 x 7 + 5
    shard = tmp_path / "000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])  # breaks off inside the shard's third sample or so
    got = list(build_pair_dataset(str(tmp_path), nothing, shuffle=False))
    assert sum(s["n_broken_shards"] for s in got) == 1
    assert len(got) + sum(s["n_skipped"] for s in got) == 40  # the lost samples are all counted
    assert 33 <= len(got) <= 35  # the 33 of the other shards and the one or two read before the break


def test_stream_resumes_mid_epoch_without_decoding_what_was_consumed(subset):
    """The items after position p of a fresh stream are those of a stream set to start at p, with
    the same augmentation draws (each sample's seed is its position)."""
    def noisy(img):
        return torch.rand(1)  # stands for a random augmentation

    ds = build_image_dataset(subset, noisy, seed=3)
    ds.set_epoch(2)
    full = [(s["pos"], s["image"].item()) for s in ds]
    ds.set_epoch(2, start={0: full[9][0]})
    rest = [(s["pos"], s["image"].item()) for s in ds]
    assert rest == full[10:]


def test_resampled_streams_draw_shards_with_replacement_by_weight(shard_dir, subset):
    """2 ranks x 2 workers, each an endless stream of whole shards drawn with replacement: the
    same seed draws the same, parts differ, and the '::' sources' weights set the shares."""
    key_shard = {r["key"]: i // 7 for i, r in enumerate(subset)}  # shard_size 7
    mixed = f"{shard_dir}/{{000000..000002}}.tar::{shard_dir}/{{000003..000005}}.tar"

    def take(rank, n, **kw):
        ds = build_pair_dataset(mixed, worker_id, rank=rank, world_size=2, seed=3, resampled=True, **kw)
        loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=as_list)
        out = []
        for batch in loader:
            out += batch
            if len(out) >= n:
                return out

    a, b = take(0, 400, weights=(1.0, 3.0)), take(0, 400, weights=(1.0, 3.0))
    assert [s["key"] for s in a] == [s["key"] for s in b]  # deterministic
    other = take(1, 400, weights=(1.0, 3.0))
    assert [s["key"] for s in a] != [s["key"] for s in other]
    by_worker = {w: [s["key"] for s in a if s["image"].item() == w] for w in (0, 1)}
    assert by_worker[0] and by_worker[1] and by_worker[0][:20] != by_worker[1][:20]
    second = [key_shard[s["key"]] >= 3 for s in a + other]
    assert 0.62 < sum(second) / len(second) < 0.88  # weight 3 of 4 (per shard, both sources 3 shards)
    assert len({s["key"] for s in a}) < len(a)  # with replacement: repeats
    ds = build_pair_dataset(mixed, worker_id, resampled=True, num_samples=1000)
    assert ds.num_samples() == 1000  # the nominal epoch
    first = [s["key"] for s, _ in zip(ds, range(30))]
    ds.set_epoch(0, start={0: 12})  # resumed after 12 samples: the same endless stream goes on
    assert [s["key"] for s, _ in zip(ds, range(18))] == first[12:]
    with pytest.raises(ValueError, match="need resampling"):
        build_pair_dataset(mixed, worker_id, weights=(1.0, 3.0))
    with pytest.raises(ValueError, match="2 '::'-separated"):
        build_pair_dataset(mixed, worker_id, resampled=True, weights=(1.0,))


def test_img2dataset_stats_and_remote_shards_give_the_epoch_size(shard_dir, tmp_path):
    """img2dataset writes {shard}_stats.json beside each shard; remote shards have no size unless set."""
    for i, n in enumerate([7, 5]):
        shutil.copy(shard_dir / f"{i:06d}.tar", tmp_path / f"{i:05d}.tar")
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({"count": n + 1, "successes": n}))
    assert build_image_dataset(str(tmp_path), nothing).num_samples() == 12
    remote = build_image_dataset(f"pipe:cat {shard_dir}/{{000000..000001}}.tar", nothing)
    assert remote.num_samples() is None and sum(1 for _ in remote) == 14
    assert build_image_dataset(f"pipe:cat {shard_dir}/000000.tar", nothing, num_samples=70).num_samples() == 70


def test_csv_and_tsv_tables_are_caption_sources(tmp_path, subset):
    """open_clip's --csv-* layout: an image column and one caption column per language."""
    import csv

    for ext, delim in (("csv", ","), ("tsv", "\t")):
        table = tmp_path / f"pairs.{ext}"
        with open(table, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["filepath", "en", "ko"])
            for r in subset[:5]:
                w.writerow([r["path"], r["en"], r["ko"]])
            w.writerow([subset[5]["path"], "only english, with, commas", ""])
        items = list(build_pair_dataset(str(table), nothing, shuffle=False))
        assert [it["captions"] for it in items[:5]] == [{"en": [r["en"]], "ko": [r["ko"]]} for r in subset[:5]]
        assert items[5]["captions"] == {"en": ["only english, with, commas"]} and items[5]["n_dropped"] == 1
    (tmp_path / "bad.csv").write_text("name,en\nx.png,hello\n")
    with pytest.raises(ValueError, match="no image column"):
        build_pair_dataset(str(tmp_path / "bad.csv"), nothing)


def test_tar_member_reader_equals_webdatasets(tmp_path):
    """Our reader of local plain tars (mae.images.shards.tar_members) yields exactly webdataset's members
    for ustar, GNU and pax archives (long and non-ASCII names, a folder, a link, a __meta__ file),
    routes compressed tars to webdataset, and raises for truncation and a corrupt header."""
    import gzip
    import tarfile

    from webdataset import tariterators

    from mae.images.shards import _plain_tar, iter_shard_samples, tar_members

    def library(path):
        return list(tariterators.tar_file_expander(tariterators.url_opener([{"url": str(path)}])))

    members = [("000001.jpg", b"\xff\xd8" + bytes(700)), ("000001.json", b'{"captions": {"en": "a"}}'),
               ("d" * 120 + "/000002.jpg", b"x" * 513), ("사진/000003.txt", "고양이".encode()),
               ("__meta__.json", b"{}"), ("000004.jpg", b"")]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            d = tarfile.TarInfo("folder")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("000001.lnk")
            link.type, link.linkname = tarfile.SYMTYPE, "000001.jpg"
            tar.addfile(link)
            for name, data in members:
                if fmt == tarfile.USTAR_FORMAT and (len(name) > 100 and "/" not in name[:155] or not name.isascii()):
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        assert _plain_tar(str(path))
        ours = list(tar_members(str(path)))
        assert ours == library(path) and len(ours) >= 4, fmt
        assert [s["key"] for s in iter_shard_samples(str(path))][:1] == ["000001"]
    raw = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:1500])
    with pytest.raises(tarfile.ReadError):
        list(tar_members(str(tmp_path / "cut.tar")))
    bad = bytearray(raw)
    bad[10] ^= 0xFF  # inside the first header's name
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(tarfile.ReadError):
        list(tar_members(str(tmp_path / "bad.tar")))
    (tmp_path / "z.tar").write_bytes(gzip.compress(raw))
    assert not _plain_tar(str(tmp_path / "z.tar"))
    assert [s["key"] for s in iter_shard_samples(str(tmp_path / "z.tar"))] == \
        [s["key"] for s in iter_shard_samples(str(path))]


# ----------------------------------------------------------------------------- curated sources (data.curation)
def _keep_files(shard_dir: Path, folder: Path, p: float) -> dict[str, str]:
    """Keep files giving every sample of the shards probability ``p``; returns {tar key: json key}."""
    from mae.images.keep import FORMAT, keep_file, unit_name
    from mae.images.shards import expand_shards, iter_shard_samples

    keys = {}
    for url in expand_shards(str(shard_dir)):
        tar_keys = []
        for s in iter_shard_samples(url):
            tar_keys.append(s["key"])
            keys[s["key"]] = json.loads(s["json"])["key"]
        path = Path(keep_file(folder, unit_name(url)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, "unit": unit_name(url), "keys": tar_keys, "p": [p] * len(tar_keys)}))
    return keys


def test_curated_shards_draw_afresh_each_epoch_and_resume_inside_one(shard_dir, tmp_path):
    from mae.images.keep import keep_draw

    keys = _keep_files(shard_dir, tmp_path / "cur", 0.5)
    ds = build_pair_dataset(str(shard_dir), nothing, shuffle=False, seed=3, curation=str(tmp_path / "cur"))
    assert ds.num_samples() == round(0.5 * len(keys)) == 20
    epochs = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        got = [s["key"] for s in ds]
        assert got == [keys[k] for k in keys if keep_draw(0.5, 3, epoch, k)]  # each drawn at its p, per epoch
        epochs.append(got)
    assert epochs[0] != epochs[1] != epochs[2]
    ds.set_epoch(1, start={0: 5})  # resumed after 5 samples of epoch 1
    assert [s["key"] for s in ds] == epochs[1][5:]
