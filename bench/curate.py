"""Captions/s per core of curation (``python -m clip.curate``) on a generated crawl, and images/s
per core of the perceptual hash.

The crawl: ``--entries`` metadata entries per language (English-like pseudo-words and bigrams;
Korean words of two or three syllables), ``--captions`` captions (60 % English, 40 % Korean, 2 %
of the Korean ones in English), each of 5 to 11 words of which one or two are entries drawn from
a Zipf distribution, written as WebDataset shards with small stand-in images (16 shards). Timed in
this process, one core:

* ``language ID``: :meth:`LanguageIdentifier.check` on every caption;
* ``matching``: :meth:`Matcher.match` (normalise, Aho–Corasick, assign matches) in batches;
* ``whole pass``: :func:`clip.data.curation.pipeline.curate` without image hashing (exact
  duplicates only): tar reading, language ID, matching, index, deduplication, caps, keep files,
  report; and its ``apply`` pass (keep probabilities and files) alone;
* ``perceptual hash``: :func:`image_signature` on the bundled emoji (PNG) and photos (JPEG,
  re-encoded at 1024 px).

``--compare`` also measures what the choices were made against: the language identifiers on the
bundled captions (English and Korean emoji names and corpus lines, Japanese captions written for
this, Korean + English pairs from ``data/parallel``), pyahocorasick against ahocorasick-rs on the
crawl, and the near-duplicate false positives and recall of each Hamming threshold on the bundled
images (every distinct pair; copies re-encoded and resized by half).

    python bench/curate.py [--captions 200000] [--entries 100000] [--compare]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from clip.data.curation.dedup import image_signature, popcount64
from clip.data.curation.langid import LanguageIdentifier
from clip.data.curation.metadata import Matcher
from clip.data.curation.pipeline import CurateConfig, curate

ROOT = Path(__file__).resolve().parents[1]

JA = ["赤いリンゴ", "東京タワーの夜景", "猫が窓辺で寝ている", "富士山と桜", "海辺の夕日", "白い犬と公園",
      "新しいスマートフォンケース", "京都の古いお寺", "ラーメンと餃子のセット", "子供が自転車に乗っている",
      "雪の降る街並み", "木製のダイニングテーブル", "青い空と白い雲", "手作りのケーキ", "女性用の革のバッグ",
      "電車の窓から見た田園風景", "カフェのラテアート", "秋の紅葉", "花束のプレゼント", "夜の渋谷交差点",
      "黒いスニーカー", "おしゃれなリビングルーム", "山の上の小屋", "お寿司の盛り合わせ", "家族で旅行",
      "ビーチで遊ぶ子供たち", "キッチンの収納アイデア", "古い写真のアルバム", "コーヒーカップと本",
      "緑の森の中の小道", "結婚式のドレス", "夏祭りの花火", "日本庭園の池", "かわいいハムスター",
      "朝ごはんのトースト", "ワインとチーズ", "雨の日の傘", "大阪城の石垣", "図書館で勉強する学生", "新幹線のホーム"]


# ----------------------------------------------------------------------------- the crawl
def entries(n: int, rng: random.Random) -> dict[str, list[str]]:
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    en, ko = set(), set()
    while len(en) < int(n * 0.7):
        en.add("".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(2, 4))))
    while len(ko) < n:
        ko.add("".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(2, 3))))
    words = sorted(en)
    while len(en) < n:
        en.add(f"{rng.choice(words)} {rng.choice(words)}")
    return {"en": sorted(en), "ko": sorted(ko)}


def captions(ents: dict[str, list[str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``(filed language, text)``: entries among filler words that match none; 2 % of the Korean
    ones are English."""
    out = []
    nrng = np.random.default_rng(0)
    fillers = {"en": ["".join(rng.choice("qxy") + rng.choice("aeiou") for _ in range(rng.randint(1, 4)))
                      for _ in range(5000)],
               "ko": ["".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(2)) for _ in range(5000)]}
    for lang, share in (("en", 0.6), ("ko", 0.4)):
        ent = ents[lang]
        p = 1.0 / np.arange(1, len(ent) + 1) ** 1.05
        p /= p.sum()
        k = int(n * share)
        picks = nrng.choice(len(ent), size=(k, 2), p=p)
        for i in range(k):
            ws = [ent[j] for j in picks[i, : rng.randint(1, 2)]] + rng.sample(fillers[lang], rng.randint(4, 9))
            rng.shuffle(ws)
            out.append((lang, " ".join(ws)))
    english = [text for lang, text in out if lang == "en"]
    ko = [i for i, (lang, _) in enumerate(out) if lang == "ko"]
    for i in rng.sample(ko, len(ko) // 50):
        out[i] = ("ko", rng.choice(english))
    return out


def write_shards(caps: list[tuple[str, str]], folder: Path, shards: int = 16) -> None:
    from webdataset import TarWriter

    per = -(-len(caps) // shards)
    for s in range(shards):
        with open(folder / f"{s:06d}.tar", "wb") as f:
            w = TarWriter(f, encoder=False, mtime=0)
            for i in range(s * per, min(len(caps), (s + 1) * per)):
                lang, text = caps[i]
                key = f"{i:09d}"
                w.write({"__key__": key, "jpg": b"\xff\xd8\xff" + key.encode() * 16,
                         "json": json.dumps({"captions": {lang: [text]}}, ensure_ascii=False).encode()})
            w.close()


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}"


# ----------------------------------------------------------------------------- measurements
def bench(args) -> None:
    rng = random.Random(0)
    ents = entries(args.entries, rng)
    caps = captions(ents, args.captions, rng)
    n = len(caps)
    print(f"crawl: {n:,} captions, {len(ents['en']):,} en and {len(ents['ko']):,} ko entries")

    lid = LanguageIdentifier(["en", "ko"])
    t = time.perf_counter()
    stats: dict = {}
    for lang, text in caps:
        lid.check({lang: [text]}, stats)
    print(f"language ID      {rate(n, time.perf_counter() - t):>9} captions/s/core   {stats}")

    matchers = {lang: Matcher(ents[lang]) for lang in ents}
    by_lang = {lang: [text for l, text in caps if l == lang] for lang in ents}
    t, found = time.perf_counter(), 0
    for lang, texts in by_lang.items():
        for s in range(0, len(texts), 10_000):
            offs, _ = matchers[lang].match(texts[s : s + 10_000])
            found += int(offs[-1])
    print(f"matching         {rate(n, time.perf_counter() - t):>9} captions/s/core   "
          f"({found / n:.2f} entries a caption)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        write_shards(caps, tmp / "shards")
        for lang in ents:
            (tmp / f"{lang}.txt").write_text("\n".join(ents[lang]) + "\n", encoding="utf-8")
        cfg = CurateConfig(str(tmp / "shards"), str(tmp / "out"), metadata={l: str(tmp / f"{l}.txt") for l in ents},
                           caps={"en": 1000}, near_dup_threshold=-1)
        t = time.perf_counter()
        summary = curate(cfg)
        whole = time.perf_counter() - t
        sec = summary["seconds"]
        print(f"whole pass       {rate(n, whole):>9} captions/s/core   (pass 1 {sec['pass1']:.1f} s, dedup and counts "
              f"{sec['dedup']:.1f} s, apply {sec['pass2']:.1f} s, total {whole:.1f} s, metadata and report included)")
        print(f"apply pass       {rate(n, sec['pass2']):>9} captions/s/core   (keep probabilities and files)")

    images = [p.read_bytes() for p in sorted((ROOT / "data/emoji/img").glob("*.png"))]
    t = time.perf_counter()
    for d in images:
        image_signature(d)
    print(f"perceptual hash  {rate(len(images), time.perf_counter() - t):>9} images/s/core     (emoji PNG 136x128)")
    photos = [_jpeg(p, 1024) for p in sorted((ROOT / "data/photos").glob("*.jpg"))] * 50
    t = time.perf_counter()
    for d in photos:
        image_signature(d)
    print(f"perceptual hash  {rate(len(photos), time.perf_counter() - t):>9} images/s/core     (JPEG photos, 1024 px)")
    if args.compare:
        compare_lid()
        compare_matching(ents, by_lang)
        compare_thresholds()


def _jpeg(path: Path, side: int, quality: int = 90) -> bytes:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img = img.resize((side, round(side * img.height / img.width)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def compare_lid() -> None:
    """Accuracy and speed of the identifiers (restricted to en/ko/ja/zh where they allow it)."""
    r = random.Random(0)
    rows = [json.loads(line) for line in open(ROOT / "data/emoji/captions.jsonl", encoding="utf-8")]

    def lines(path, k):
        got = [x.strip() for x in open(path, encoding="utf-8") if 3 <= len(x.strip()) <= 80]
        r.shuffle(got)
        return got[:k]

    pairs = [x.rstrip("\n").split("\t") for x in open(ROOT / "data/parallel/en_ko.tsv", encoding="utf-8")][1:]
    r.shuffle(pairs)
    sets = {"en": [x["en"] for x in rows] + lines(ROOT / "data/corpus/en.txt", 1000),
            "ko": [x["ko"] for x in rows] + lines(ROOT / "data/corpus/ko.txt", 1000), "ja": JA,
            "ko+en": [f"{k} {e}" for e, k, _ in pairs[:500]]}
    ids = {"ours (scripts, then py3langid)": LanguageIdentifier(["en", "ko"]).identify}
    from py3langid.langid import MODEL_FILE, LanguageIdentifier as Py3

    py3 = Py3.from_model_file(MODEL_FILE)
    py3.set_languages(["en", "ko", "ja", "zh"])
    ids["py3langid alone"] = lambda s: py3.classify(s)[0]
    try:
        from lingua import Language, LanguageDetectorBuilder

        det = LanguageDetectorBuilder.from_languages(Language.ENGLISH, Language.KOREAN, Language.JAPANESE,
                                                     Language.CHINESE).build()
        ids["lingua"] = lambda s: (lambda x: x.iso_code_639_1.name.lower() if x else "?")(det.detect_language_of(s))
    except ImportError:
        pass
    try:
        import pycld2

        ids["pycld2 (all languages)"] = lambda s: pycld2.detect(s)[2][0][1]
    except ImportError:
        pass
    print("\nlanguage ID: accuracy per set (ko+en: share called ko), us/caption")
    for name, f in ids.items():
        for texts in sets.values():
            [f(x) for x in texts[:20]]  # load models
        t, cells, total = time.perf_counter(), [], 0
        for lang, texts in sets.items():
            got = [f(x) for x in texts]
            total += len(texts)
            target = "ko" if lang == "ko+en" else lang
            cells.append(f"{lang} {sum(g == target for g in got) / len(got):.3f}")
        print(f"  {name:32s} {1e6 * (time.perf_counter() - t) / total:6.1f} us   " + "  ".join(cells))
    from clip.data.curation.langid import is_mixed

    print(f"  mixed (ours): ko+en pairs {np.mean([is_mixed(x) for x in sets['ko+en']]):.3f}, "
          f"ko lines {np.mean([is_mixed(x) for x in sets['ko']]):.3f}, "
          f"en lines {np.mean([is_mixed(x) for x in sets['en']]):.3f}")


def compare_matching(ents, by_lang) -> None:
    """The same work with either library: normalise a joined batch, find every (overlapping)
    match, assign matches to captions."""
    print("\nAho-Corasick: captions/s/core (normalise, find all matches, assign them to captions)")
    try:
        import ahocorasick
    except ImportError:
        print("  pyahocorasick not installed")
        return
    import ahocorasick_rs

    from clip.data.curation.metadata import normalize_many, patterns

    for lang, texts in by_lang.items():
        pats = [p for e in ents[lang] for p in patterns(e)]
        py = ahocorasick.Automaton()
        for i, p in enumerate(pats):
            py.add_word(p, i)
        py.make_automaton()
        rs = ahocorasick_rs.AhoCorasick(pats)
        finders = {"pyahocorasick": lambda big: np.fromiter((e + 1 for e, _ in py.iter(big)), dtype=np.int64),
                   "ahocorasick-rs": lambda big: np.asarray(rs.find_matches_as_indexes(big, overlapping=True),
                                                            dtype=np.int64).reshape(-1, 3)[:, 2]}
        cells = []
        for name, find in finders.items():
            t = time.perf_counter()
            for s in range(0, len(texts), 10_000):
                big = " " + " \n ".join(normalize_many(texts[s : s + 10_000])) + " "
                breaks = np.flatnonzero(np.frombuffer(big.encode("utf-32-le"), np.uint32) == 10)
                np.searchsorted(breaks, find(big))
            cells.append(f"{name} {len(texts) / (time.perf_counter() - t):,.0f}")
        print(f"  {lang}: " + "   ".join(cells))


def compare_thresholds() -> None:
    from PIL import Image

    from mae.images.decode import load_rgb

    files = sorted((ROOT / "data/emoji/img").glob("*.png")) + sorted((ROOT / "data/photos").glob("*.jpg"))
    data = [p.read_bytes() for p in files]
    sig = [image_signature(d) for d in data]
    h = np.array([s[0] for s in sig], dtype=np.uint64)
    colour = np.array([s[1] for s in sig], dtype=np.uint64)
    i, j = np.triu_indices(len(h), 1)
    same = np.array([data[a] == data[b] for a, b in zip(i, j)])  # byte-identical bundled files: true copies
    dist = popcount64(h[i] ^ h[j])
    from clip.data.curation.dedup import colour_close

    close = colour_close(colour[i], colour[j])
    variants = []
    r = random.Random(0)
    for k in r.sample(range(len(data) - 2), 100) + [len(data) - 2, len(data) - 1]:
        img = load_rgb(data[k])
        for q in (90, 60):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=q)
            variants.append((k, buf.getvalue()))
        half = img.resize((img.width // 2, img.height // 2), Image.BILINEAR)
        buf = io.BytesIO()
        half.save(buf, "JPEG", quality=85)
        variants.append((k, buf.getvalue()))
    vs = [(k, image_signature(v)) for k, v in variants]
    print(f"\nnear duplicates on {len(h)} bundled images ({(~same).sum():,} distinct pairs; "
          f"{same.sum()} byte-identical "
          f"pairs left out) and {len(vs)} copies (JPEG q90, q60, half size q85) of 102 of them")
    for T in range(0, 13, 2):
        fp = (dist <= T) & close & ~same
        imgs = len(set(i[fp]) | set(j[fp]))
        found = np.mean([int(popcount64(np.array([h[k] ^ np.uint64(s[0])]))[0]) <= T
                         and bool(colour_close(np.array([colour[k]]), np.array([s[1]], dtype=np.uint64))[0])
                         for k, s in vs])
        print(f"  threshold {T:2d}: false-positive pairs {fp.sum():4d} ({fp.mean():.1e}), images merged with "
              f"another {imgs:4d} ({imgs / len(h):.1%}); copies found {found:.1%}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=int, default=200_000)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--compare", action="store_true", help="also measure the alternatives behind the choices")
    bench(p.parse_args())
