"""Caption translation (``python -m clip.translate``) with a tiny random multi-target Marian model
built here: the output's structure is what training reads, every target language is present,
and a run killed mid-way loses nothing already written and resumes without duplicates (quality
is not tested: the model is random)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_tiny import save_tiny_marian

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["es", "ja", "hi"]


@pytest.fixture(scope="module")
def marian(tmp_path_factory) -> Path:
    return save_tiny_marian(tmp_path_factory.mktemp("mt") / "marian", TARGETS)


@pytest.fixture
def manifest(tmp_path) -> Path:
    rows = [json.loads(line) for line in (ROOT / "data" / "emoji" / "captions.jsonl").read_text(encoding="utf-8")
            .splitlines()][::150][:10]
    rows[4] = {**rows[4], "en": ["first caption", "second caption"]}  # two captions -> two translations each
    rows[7] = {k: v for k, v in rows[7].items() if k != "en"}  # no source caption: kept as it is
    src = tmp_path / "in" / "m.jsonl"
    src.parent.mkdir()
    (src.parent / "img").symlink_to(ROOT / "data" / "emoji" / "img")
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return src


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_translate_cli_writes_training_captions(marian, manifest, tmp_path, capsys):
    from clip.data.pairs import PairDataset
    from mae.images.decode import Decoded
    from clip.translate import main

    out = tmp_path / "out" / "translated.jsonl"
    assert main(["--manifest", str(manifest), "--model", str(marian), "--source", "en", "--targets", *TARGETS,
                 "--out", str(out), "--batch-size", "4", "--max-new-tokens", "6", "--no-progress"]) == 0
    assert "10 rows, 0 already done, 9 translated" in capsys.readouterr().out
    src, got = _rows(manifest), _rows(out)
    assert [r["key"] for r in got] == [r["key"] for r in src]
    for s, r in zip(src, got):
        if "en" not in s:
            assert "captions" not in r
            continue
        en = s["en"] if isinstance(s["en"], list) else [s["en"]]
        assert r["captions"]["en"] == en
        for t in TARGETS:
            assert len(r["captions"][t]) == len(en) and all(isinstance(c, str) for c in r["captions"][t])
        assert r["ko"] == s["ko"] and r["file"] == "../in/" + s["file"]  # rebased on the output's folder
    # training reads the translations: one slot per language, images found from the new folder
    samples = list(PairDataset(str(out), Decoded(lambda im: im.size), languages=["en", *TARGETS], shuffle=False))
    assert len(samples) == 9 and all(set(s["captions"]) == {"en", *TARGETS} for s in samples
                                     if all(s["captions"].get(t) for t in TARGETS))


def test_marian_target_tokens_and_family_rules(marian):
    from clip.data.translate import Translator, build_translators

    tr = Translator(str(marian), "en", max_new_tokens=4)
    assert tr.family == "marian"
    for t in TARGETS:
        ids = tr.inputs(["grinning face"], t)["input_ids"][0]
        assert ids[0].item() == tr.tok.convert_tokens_to_ids(f">>{t}<<")  # the target token leads every input
    with pytest.raises(ValueError, match="cannot translate into 'de'"):
        build_translators([str(marian)], "en", ["de"])
    with pytest.raises(ValueError, match="no model for target 'ja'"):
        build_translators([f"es={marian}"], "en", ["es", "ja"])


def test_translation_resumes_after_a_kill(marian, manifest, tmp_path, monkeypatch):
    from clip.data import translate

    out = tmp_path / "t.jsonl"
    translators = translate.build_translators([str(marian)], "en", TARGETS, max_new_tokens=4)
    real, calls = translate.Translator.__call__, {"n": 0}

    def dies_in_batch_two(self, texts, target):
        calls["n"] += 1
        if calls["n"] > len(TARGETS):  # the second batch's first generate: the process is killed
            raise KeyboardInterrupt
        return real(self, texts, target)

    monkeypatch.setattr(translate.Translator, "__call__", dies_in_batch_two)
    with pytest.raises(KeyboardInterrupt):
        translate.translate_manifest(manifest, out, translators, "en", TARGETS, batch_size=4)
    first = out.read_bytes()
    assert len(_rows(out)) == 4  # the first batch was written whole and synced
    with open(out, "ab") as f:  # and a kill in the middle of a write leaves a torn line
        f.write(b'{"key": "torn", "captions": {"es": ["hal')
    monkeypatch.setattr(translate.Translator, "__call__", real)
    stats = translate.translate_manifest(manifest, out, translators, "en", TARGETS, batch_size=4)
    assert stats == {"rows": 10, "already_done": 4, "translated": 5, "no_source_caption": 1}
    data = out.read_bytes()
    assert data.startswith(first)  # nothing already written was rewritten
    keys = [r["key"] for r in _rows(out)]
    assert keys == [r["key"] for r in _rows(manifest)]  # each once, in order, the torn line gone
    again = translate.translate_manifest(manifest, out, translators, "en", TARGETS, batch_size=4)
    assert again["already_done"] == 10 and again["translated"] == 0 and out.read_bytes() == data


def test_translate_bad_input_is_one_line(marian, manifest, tmp_path, capsys):
    from clip.translate import main

    cases = [(["--manifest", str(tmp_path / "nope.jsonl"), "--model", str(marian)], "manifest not found"),
             (["--manifest", str(manifest), "--model", str(tmp_path)], "not a local transformers model folder"),
             (["--manifest", str(manifest), "--model", str(marian), "--targets", "en"], "includes the source")]
    for argv, msg in cases:
        argv = argv + ([] if "--targets" in argv else ["--targets", "es"]) + ["--out", str(tmp_path / "o.jsonl")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
