"""Any-language evaluation: the Crossmodal-3600 and XTD10 layouts and Babel-ImageNet's class names
read without download (fixtures: the bundled emoji written into those layouts), and
``python -m clip.eval`` reporting every language of the data, marked seen or unseen in training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A stand-in third language for the fixtures: the emoji's English keywords written as "de"
# captions, a language code the tiny model below never trained on (structure, not quality).
LANGS = ("en", "ko", "de")


def _emoji(n: int = 24) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "data" / "emoji" / "captions.jsonl").read_text(encoding="utf-8")
            .splitlines()][::60][:n]
    for r in rows:
        r["de"] = " ".join(r["en_keywords"]) or r["en"]
    return rows


def _write_xm3600(root: Path, rows) -> Path:
    (root / "xm3600" / "images").mkdir(parents=True)
    lines = []
    for r in rows:
        shutil.copy(ROOT / "data" / "emoji" / r["file"], root / "xm3600" / "images" / f"{r['key']}.jpg")
        lines.append({"image/key": r["key"], **{lang: {"caption": [r[lang]], "caption/tokenized": [r[lang]]}
                                                 for lang in LANGS}})
    (root / "xm3600" / "captions.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                                     encoding="utf-8")
    return root


def _write_xtd10(root: Path, rows) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "STAIR").mkdir()
    names = [f"{r['key']}.png" for r in rows]
    for r, n in zip(rows, names):
        shutil.copy(ROOT / "data" / "emoji" / r["file"], root / "images" / n)
    (root / "test_image_names.txt").write_text("\n".join(names) + "\n")
    for lang in ("en", "ko"):
        (root / f"test_1kcaptions_{lang}.txt").write_text("\n".join(r[lang] for r in rows) + "\n", encoding="utf-8")
    (root / "STAIR" / "test_1kcaptions_jp.txt").write_text("\n".join(r["emoji"] for r in rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def en_only_run(tmp_path_factory, make_tiny_clip_run):
    """A tiny random CLIP whose checkpoint says it was trained on English captions only."""
    return make_tiny_clip_run(tmp_path_factory.mktemp("ml") / "run", languages=["en"])


def test_xm3600_and_xtd10_readers(tmp_path):
    from clip.eval.layouts import manifest_languages, read_layout

    rows = _emoji()
    xm = read_layout("xm3600", str(_write_xm3600(tmp_path / "a", rows)), None)
    assert [r["key"] for r in xm] == [r["key"] for r in rows] and all(Path(r["path"]).is_file() for r in xm)
    assert manifest_languages(xm) == ["de", "en", "ko"]
    assert xm[3]["captions"] == {lang: [rows[3][lang]] for lang in LANGS}
    assert [r["captions"]["ko"] for r in read_layout("xm3600", str(tmp_path / "a"), ["ko"])] == [[r["ko"]] for r in rows]

    root = _write_xtd10(tmp_path / "b", rows)
    xtd = read_layout("xtd10", str(root), ["en", "ko", "ja"])
    assert len(xtd) == len(rows) and all(Path(r["path"]).is_file() for r in xtd)
    assert xtd[5]["captions"] == {"en": [rows[5]["en"]], "ko": [rows[5]["ko"]], "ja": [rows[5]["emoji"]]}
    (root / "test_1kcaptions_ko.txt").write_text("one line\n", encoding="utf-8")
    with pytest.raises(ValueError, match="1 captions for 24 images"):
        read_layout("xtd10", str(root), ["ko"])
    with pytest.raises(FileNotFoundError, match="test_1kcaptions_zh.txt"):
        read_layout("xtd10", str(root), ["zh"])
    # flat emoji rows: only fields named by a language code count
    assert manifest_languages(rows) == ["de", "en", "ko"]


def test_babel_imagenet_from_the_installed_clip_benchmark():
    pytest.importorskip("clip_benchmark")
    from clip.eval.layouts import babel_imagenet

    tables = babel_imagenet(["ko", "de"])
    for lang, (labels, names, templates) in tables.items():
        assert len(labels) == len(names) > 100 and all(0 <= int(x) < 1000 for x in labels)
        assert templates and all("{}" in t for t in templates)
    assert tables["ko"][1][tables["ko"][0].index("1")] == "금붕어"  # ImageNet class 1, goldfish
    with pytest.raises(ValueError, match="no language 'xx'"):
        babel_imagenet(["xx"])


def test_eval_cli_reports_unseen_languages(en_only_run, tmp_path, capsys):
    from clip.eval import main

    root = _write_xm3600(tmp_path / "xm", _emoji())
    assert main(["retrieval", "--checkpoint", str(en_only_run), "--layout", "xm3600", "--data", str(root),
                 "--languages", "all", "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "o" / "metrics_retrieval.json").read_text(encoding="utf-8"))
    assert res["trained_languages"] == ["en"] and res["n_images"] == 24
    assert {k: v["seen_in_training"] for k, v in res["languages"].items()} == {"de": False, "en": True, "ko": False}
    for sec in res["languages"].values():
        assert sec["n_texts"] == 24 and 0.0 <= sec["text_to_image_R@10"] <= 1.0
        assert 1 <= sec["text_to_image_rank_median"] <= 24
    out = capsys.readouterr().out
    assert "no (unseen)" in out and out.count("\n") >= 4


def test_eval_cli_babel_imagenet_zeroshot(en_only_run, tmp_path):
    pytest.importorskip("clip_benchmark")
    from clip.eval import main
    from clip.eval.layouts import babel_imagenet

    tables = babel_imagenet(["ko", "de"])
    shared = [x for x in tables["ko"][0] if x in set(tables["de"][0])][:6]
    rows = [{**r, "file": str(ROOT / "data" / "emoji" / r["file"]), "label": int(shared[i % 6])}
            for i, r in enumerate(_emoji(12))]  # emoji standing in for ImageNet photos of 6 classes
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prompts = tmp_path / "prompts.json"  # 2 of Babel-ImageNet's 80 prompts per language: a fast test
    prompts.write_text(json.dumps({lang: babel_imagenet([lang])[lang][2][:2] for lang in ("ko", "de")}))
    assert main(["zeroshot", "--checkpoint", str(en_only_run), "--data", str(manifest), "--babel-imagenet",
                 "--templates", str(prompts), "--languages", "ko", "de", "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "o" / "metrics_zeroshot.json").read_text(encoding="utf-8"))
    for lang in ("ko", "de"):
        sec = res["languages"][lang]
        assert sec["n_classes"] == len(tables[lang][0]) and sec["n_images"] == 12
        assert sec["seen_in_training"] is False and 0.0 <= sec["acc1"] <= sec["acc5"] <= 1.0
        assert sec["n_templates"] == 2
