"""Curation (clip.data.curation, python -m clip.curate) on a generated crawl with a Zipf
distribution over metadata entries in both languages: caps, the tail-share rule, shares,
relabelling, deduplication of planted copies, the online draw, parallel counts, bad input."""
from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip.curate import main as curate_main
from clip.data.curation.engines import run_units
from clip.data.curation.langid import LanguageIdentifier
from clip.data.curation.metadata import Matcher, read_entries
from clip.data.curation.online import draw_caption
from mae.images.keep import CurationKeep, keep_draw
from clip.data.curation.scan import ScanSettings, make_units, scan_unit
from mae.images.decode import load_rgb
from mae.images.shards import iter_shard_samples

ROOT = Path(__file__).resolve().parents[1]
E, T_EN = 120, 40
EN_TOP, KO_TOP = 400, 200  # Zipf: entry of rank r matched by round(TOP / r) captions
JA = ["赤いリンゴ", "東京タワーの夜景", "猫が窓辺で寝ている", "富士山と桜", "海辺の夕日",
      "白い犬と公園", "京都の古いお寺", "秋の紅葉", "夏祭りの花火", "雪の降る街並み"]


def _en_word(i: int) -> str:  # entries: letters without q
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    return "".join(cons[(i // 5**k) % 18] + vow[(i // 90**k) % 5] for k in range(3))


def _filler(i: int, hangul: bool) -> str:  # unique per caption, never an entry nor an entry's head
    if hangul:
        return "".join(chr(0xD558 + (i // 60**k) % 60) for k in range(3))  # 하..., entries start below 0xC000
    return "q" + "".join("abcdefghijklmnopqrstuvwxyz"[(i // 26**k) % 26] for k in range(4))


def _ko_word(i: int) -> str:
    return chr(0xAC00 + 37 * (i % 300)) + chr(0xB000 + 11 * (i // 300 + i % 97))


EN = [_en_word(i) for i in range(E)]
KO = [_ko_word(i) for i in range(E)]
assert len(set(EN)) == E and len(set(KO)) == E


def _zipf(top: int) -> list[int]:
    return [max(1, round(top / r)) for r in range(1, E + 1)]


def _write_crawl(folder: Path, shards: int = 4) -> dict:
    """Shards of samples with one caption each; planted: English and Japanese captions under ko."""
    from webdataset import TarWriter

    rows, n = [], 0
    for lang, words, top in (("en", EN, EN_TOP), ("ko", KO, KO_TOP)):
        for e, c in enumerate(_zipf(top)):
            for _ in range(c):
                text = f"{words[e]}{'를' if lang == 'ko' and n % 3 == 0 else ''} {_filler(n, lang == 'ko')}"
                rows.append((lang, text, None))
                n += 1
    for j in range(30):  # English filed under ko: tail en entries (kept with probability 1)
        rows.append(("ko", f"a photo of {EN[E - 1 - j]} {_filler(n, False)}", "en"))
        n += 1
    for j, ja in enumerate(JA):
        rows.append(("ko", ja, "ja"))
    random.Random(0).shuffle(rows)
    folder.mkdir(parents=True)
    planted = {}
    per = math.ceil(len(rows) / shards)
    for s in range(shards):
        with open(folder / f"{s:06d}.tar", "wb") as f:
            w = TarWriter(f, encoder=False, mtime=0)
            for i in range(s * per, min(len(rows), (s + 1) * per)):
                lang, text, truth = rows[i]
                key = f"{i:09d}"
                w.write({"__key__": key, "jpg": b"\xff\xd8\xff" + key.encode(),
                         "json": json.dumps({"captions": {lang: [text]}}, ensure_ascii=False).encode()})
                if truth:
                    planted[key] = (truth, text)
            w.close()
    (folder.parent / "en.txt").write_text("\n".join(EN) + "\n", encoding="utf-8")
    (folder.parent / "ko.txt").write_text("\n".join(KO) + "\n", encoding="utf-8")
    return planted


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    root = tmp_path_factory.mktemp("crawl")
    planted = _write_crawl(root / "shards")
    return root, planted


def _run(root: Path, name: str, *extra: str) -> tuple[int, dict, Path]:
    out = root / name
    rc = curate_main([str(root / "shards"), "--out", str(out), "--metadata", f"en={root / 'en.txt'}",
                      f"ko={root / 'ko.txt'}", "--near-dup-threshold", "-1",
                      "--write-shards", str(root / f"{name}_shards"), *extra])
    summary = json.loads((out / "curation.json").read_text()) if rc == 0 else {}
    return rc, summary, out


def _kept_captions(folder: Path) -> dict[str, dict]:
    return {s["key"]: json.loads(s["json"])["captions"] for url in sorted(folder.glob("*.tar"))
            for s in iter_shard_samples(str(url))}


@pytest.fixture(scope="module")
def relabelled(crawl):
    root, planted = crawl
    rc, summary, out = _run(root, "relabel", "--t", f"en={T_EN}")
    assert rc == 0
    return root, planted, summary, out


def test_head_entries_sampled_to_the_cap_and_tail_kept(relabelled):
    root, _, summary, out = relabelled
    counts = np.load(out / "counts.npz")
    kept = _kept_captions(root / "relabel_shards")
    for lang, words in (("en", EN), ("ko", KO)):
        live, after, t = counts[f"{lang}_live"], counts[f"{lang}_after"], summary["caps"][lang]
        m, realized = Matcher(words), np.zeros(E)
        for caps in kept.values():
            _, ids = m.match(caps.get(lang, []))
            realized[ids] += 1
        head = live > t
        assert head.sum() >= 5, "the crawl must have head entries"
        np.testing.assert_allclose(after[head], t, rtol=1e-6)  # expected count after = t_lang
        sd = np.sqrt(t * (1 - t / live[head]))
        assert np.all(np.abs(realized[head] - t) <= 4.5 * sd + 1), (lang, realized[head], t)
        np.testing.assert_array_equal(realized[~head], live[~head])  # every tail sample kept


def test_t_ko_follows_the_tail_share_rule(relabelled):
    _, _, summary, out = relabelled
    counts = np.load(out / "counts.npz")
    en, ko = counts["en_live"].tolist(), sorted(counts["ko_live"].tolist())
    p = sum(c for c in en if c < T_EN) / sum(en)
    running, best, t_ko = 0, None, None
    for c in ko:  # the first count where the cumulative share is closest to p
        running += c
        if best is None or abs(running / sum(ko) - p) < best:
            best, t_ko = abs(running / sum(ko) - p), c
    assert summary["caps"]["en"] == T_EN
    assert summary["caps"]["ko"] == t_ko
    assert 0.2 < p < 0.9 and t_ko < KO_TOP  # a real cap, not everything kept


def test_wrong_language_captions_relabelled(relabelled, crawl):
    root, planted, summary, _ = relabelled
    assert summary["stats"]["lid_relabelled"] == 30
    assert summary["stats"]["lid_dropped_other_language"] == len(JA)
    kept = _kept_captions(root / "relabel_shards")
    for key, (truth, text) in planted.items():
        if truth == "en":  # tail entries: kept for sure, now under en
            assert kept[key] == {"en": [text]}
        else:
            assert key not in kept  # Japanese: no curated language left
    rc, dropped, _ = _run(crawl[0], "drop", "--t", f"en={T_EN}", "--mislabelled", "drop")
    assert rc == 0 and dropped["stats"]["lid_dropped_mislabelled"] == 30 + len(JA)


def test_target_share_reached(crawl):
    root, _ = crawl
    rc, summary, _ = _run(root, "share", "--t", f"en={T_EN}", "--target-share", "ko=0.4")
    assert rc == 0
    exp = summary["captions_expected_after"]
    assert exp["ko"] / (exp["ko"] + exp["en"]) == pytest.approx(0.4, abs=1e-4)
    kept = _kept_captions(root / "share_shards")
    n_ko = sum("ko" in c for c in kept.values())
    share = n_ko / len(kept)
    assert abs(share - 0.4) <= 4 * math.sqrt(0.4 * 0.6 / len(kept)), share


def test_count_pass_two_processes_equal_one(crawl, tmp_path):
    root, _ = crawl
    from mae.images.sources import resolve_source

    units = make_units(*resolve_source(str(root / "shards")))
    assert len(units) == 4
    entries = {"en": read_entries(root / "en.txt"), "ko": read_entries(root / "ko.txt")}
    results = []
    for workers, work in ((1, tmp_path / "a"), (2, tmp_path / "b")):
        work.mkdir()
        s = ScanSettings(("en", "ko"), ("en", "ko", "ja", "zh"), "relabel", entries, str(work), False, "fp")
        results.append(run_units(scan_unit, [(u,) for u in units], s, "multiprocessing", workers))
    for lang in ("en", "ko"):
        one, two = (np.sum([r["counts"][lang] for r in res], axis=0) for res in results)
        np.testing.assert_array_equal(one, two)
        assert one.sum() > 1000
    for a, b in zip(sorted((tmp_path / "a").glob("*.npz")), sorted((tmp_path / "b").glob("*.npz"))):
        za, zb = np.load(a), np.load(b)
        assert all(np.array_equal(za[k], zb[k]) for k in za.files)



def test_ray_engine_curates_as_one_process(relabelled):
    """``--engine ray`` (the optional extra; skipped where Ray is not installed, as in CI): the
    passes as Ray tasks on a local cluster give the same report, keep files and shards."""
    ray = pytest.importorskip("ray")
    root, _, want, out = relabelled
    try:
        rc, got, ray_out = _run(root, "ray", "--t", f"en={T_EN}", "--engine", "ray", "--workers", "2")
    finally:
        ray.shutdown()  # the local cluster the run started
    assert rc == 0
    where = ("out", "write_shards", "engine", "workers")  # the run's own settings, not its result
    got_cfg, want_cfg = got.pop("config"), dict(want["config"])
    assert {k: v for k, v in got_cfg.items() if k not in where} == {k: v for k, v in want_cfg.items() if k not in where}
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k not in ("seconds", "config")}
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".npz")
                   and p.name != "curation.json")
    assert files and files == sorted(p.relative_to(ray_out) for p in ray_out.rglob("*") if p.is_file()
                                     and p.suffix in (".json", ".npz") and p.name != "curation.json")
    for f in files:  # keep probabilities and counts: byte for byte
        assert (out / f).read_bytes() == (ray_out / f).read_bytes(), f
    assert _kept_captions(root / "ray_shards") == _kept_captions(root / "relabel_shards")

# ----------------------------------------------------------------------------- duplicates
def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


EMOJI = ["1f600", "1f431", "1f34e", "1f697", "1f3e0", "1f4da", "1f308", "1f333", "1f41d", "1f3b8"]


def test_planted_duplicates_found_one_copy_kept(tmp_path):
    photos = {p.stem: p.read_bytes() for p in sorted((ROOT / "data/photos").glob("*.jpg"))}
    chelsea = Image.open(io.BytesIO(photos["chelsea"]))
    originals = {**photos, **{e: (ROOT / f"data/emoji/img/{e}.png").read_bytes() for e in EMOJI}}
    copies = {"chelsea_bytes": photos["chelsea"],  # byte-identical
              "coffee_q60": _jpeg(Image.open(io.BytesIO(photos["coffee"])), 60),  # re-encoded
              "chelsea_half": _jpeg(chelsea.resize((chelsea.width // 2, chelsea.height // 2)), 90),  # resized by half
              "apple_q75": _jpeg(load_rgb(originals["1f34e"]), 75)}
    rows = []
    for i, (name, data) in enumerate([*originals.items(), *copies.items()]):
        (tmp_path / f"{name}.img").write_bytes(data)
        rows.append({"key": name, "file": f"{name}.img", "en": f"tail word{i} {_en_word(i)}"})
    rows.append({"key": "same_caption", "file": "cat.img", "en": rows[0]["en"]})  # a duplicate caption
    (tmp_path / "cat.img").write_bytes(_jpeg(Image.new("RGB", (64, 48), (200, 30, 30)), 90))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "en.txt").write_text("\n".join(_en_word(i) for i in range(len(rows))) + "\n")
    rc = curate_main([str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out"), "--languages", "en",
                      "--metadata", f"en={tmp_path / 'en.txt'}", "--t", "en=1000"])
    assert rc == 0
    summary = json.loads((tmp_path / "out/curation.json").read_text())
    assert summary["dropped"]["exact_duplicate"] == 1
    assert summary["dropped"]["near_duplicate"] == 3
    assert summary["dropped"]["duplicate_caption"] == 1
    probs = CurationKeep(tmp_path / "out").probabilities(records=True)
    assert all(probs[k] == 1.0 for k in originals), "distinct images merged"  # first copies kept
    assert all(probs[k] == 0.0 for k in [*copies, "same_caption"])


# ----------------------------------------------------------------------------- online
def test_online_draw_per_epoch_at_its_probability():
    keys = [f"{i:09d}" for i in range(300)]
    for p in (0.1, 0.5, 0.9):
        epochs = 200
        kept = np.array([[keep_draw(p, 7, e, k) for k in keys] for e in range(epochs)])  # (epochs, keys)
        n = kept.size
        assert abs(kept.mean() - p) <= 4 * math.sqrt(p * (1 - p) / n)
        per_key = kept.sum(0)  # each sample drawn at its probability: binomial spread, no stuck keys
        z = (per_key - epochs * p) / math.sqrt(epochs * p * (1 - p))
        assert abs(z).max() < 5 and 0.7 < z.var() < 1.4
        assert (kept[0] != kept[1]).any()  # a fresh draw each epoch
    assert keep_draw(1.0, 0, 0, "a") and not keep_draw(0.0, 0, 0, "a")


def test_online_draw_is_a_pure_function_of_seed_epoch_key():
    keys = [f"k{i}" for i in range(200)]
    here = [keep_draw(0.5, 3, 11, k) for k in keys]
    code = ("from mae.images.keep import keep_draw; "
            f"print(''.join('1' if keep_draw(0.5, 3, 11, k) else '0' for k in {keys!r}))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, check=True).stdout.strip()
    assert there == "".join("1" if k else "0" for k in here)
    assert here != [keep_draw(0.5, 4, 11, k) for k in keys]  # the seed matters


def test_weighted_caption_variants():
    caps = {"en": ["a cat"], "ko": ["고양이", "고양이 사진"]}
    sources = {"ko": ["original", "translated"]}
    rng = random.Random(0)
    draws = [draw_caption(caps, {"translated": 0.0, "en": 3.0}, rng, sources) for _ in range(4000)]
    assert ("ko", "고양이 사진") not in draws  # weight 0: never
    en = sum(d[0] == "en" for d in draws) / len(draws)
    assert abs(en - 0.75) < 0.03  # en 3 : ko:original 1
    assert draw_caption({}, {}, rng) is None


def test_korean_particles_and_single_syllables():
    m = Matcher(["사과", "눈", "new york", "york"])
    offs, ids = m.match(["사과를 먹는다", "눈이 온다", "눈썹", "A New-York taxi"])
    assert [ids[offs[i]:offs[i + 1]].tolist() for i in range(4)] == [[0], [1], [], [2, 3]]
    lid = LanguageIdentifier(["en", "ko"])
    assert lid.identify("RPC 오류") == "ko" and lid.identify("赤いリンゴ") == "ja"


# ----------------------------------------------------------------------------- bad input
def _bad(capsys, tmp_path, args):
    out = tmp_path / "out"
    rc = curate_main([*args[:1], "--out", str(out), *args[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err, out


def test_bad_input_one_line_exit_2_nothing_left(tmp_path, capsys, crawl):
    root, _ = crawl
    src = str(root / "shards")
    meta = ["--metadata", f"en={root / 'en.txt'}", f"ko={root / 'ko.txt'}", "--t", "en=10"]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"file": "x.png", "fr": "bonjour"}) + "\n")
    (tmp_path / "x.png").write_bytes((ROOT / "data/emoji/img/1f600.png").read_bytes())
    (tmp_path / "blocker").write_text("a file")
    cases = [
        ([src, "--metadata", f"en={ROOT / 'data/photos/chelsea.jpg'}", f"ko={root / 'ko.txt'}", "--t", "en=10"], "not"),
        ([src, "--metadata", f"xx={root / 'en.txt'}", f"ko={root / 'ko.txt'}", "--t", "en=10"], "unknown language"),
        ([str(tmp_path / "empty.jsonl"), *meta], "no captions"),
        ([str(ROOT / "data/photos"), *meta], "no captions"),
    ]
    for args, words in cases:
        rc, err, out = _bad(capsys, tmp_path, args)
        assert rc == 2 and len(err) == 1 and words in err[0], (args, err)
        assert not out.exists(), "nothing may be left behind"
    rc = curate_main([src, "--out", str(tmp_path / "blocker" / "out"), *meta])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot write" in err[0]
    try:
        import ray  # noqa: F401
    except ImportError:  # Ray is an optional extra: its absence is one line too
        rc, err, out = _bad(capsys, tmp_path, [src, *meta, "--engine", "ray"])
        assert rc == 2 and len(err) == 1 and "pip install" in err[0] and not out.exists()


def test_help():
    out = subprocess.run([sys.executable, "-m", "clip.curate", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--write-shards" in out.stdout
