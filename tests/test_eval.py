"""clip.eval.metrics / clip.eval.tasks / clip.eval: hand-computed metrics, chance level and k cap, a
synthetic zero-shot case with a known answer, the held-out validation against the CLI and a
reference loss, the charts, and the CLI (JSON schema, error paths) on a tiny CLIP over bundled
emoji rows."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip.eval.encode import zeroshot_classifier
from clip.eval import main
from clip.eval.tasks import (
    evaluate_crosslingual, evaluate_heldout, evaluate_retrieval, evaluate_zeroshot, flatten_metrics,
)
from clip.eval.metrics import (
    accuracy_at_k, chance_at_k, class_ranks, curve_ks, metrics_from_ranks, rank_stats, ranks_from_scores,
    retrieval_ranks,
)

GROUPS_KO = {
    "Smileys & Emotion": "스마일리 및 감정", "People & Body": "사람 및 신체", "Animals & Nature": "동물 및 자연",
    "Food & Drink": "음식 및 음료", "Travel & Places": "여행 및 장소", "Activities": "활동", "Objects": "사물",
    "Symbols": "기호", "Flags": "깃발",
}


# ----------------------------------------------------------------------------- metrics

def test_ranks_ties_are_pessimistic():
    scores = torch.tensor([[0.5, 0.5, 0.2], [0.5, 0.5, 0.2], [0.3, 0.3, 0.3], [float("nan"), 0.1, 0.0]])
    correct = torch.zeros(4, 3, dtype=torch.bool)
    correct[0, 0] = correct[1, 2] = correct[2, 1] = correct[3, 0] = True
    # tie with one wrong item -> 2 (optimistic would say 1); all equal -> last; NaN -> last
    assert ranks_from_scores(scores, correct).tolist() == [2, 3, 3, 3]
    assert accuracy_at_k(class_ranks(scores[:3], torch.tensor([0, 2, 1])), ks=(1, 2, 3)) == {1: 0.0, 2: 1 / 3, 3: 1.0}


def test_retrieval_metrics_hand_computed_several_captions():
    image_emb = torch.eye(3)  # so scores[m, n] = text_emb[m, n]
    text_emb = torch.tensor([[0.1, 0.9, 0.0],   # image 0: image 1 scores higher -> rank 2
                             [0.8, 0.2, 0.0],   # image 0: rank 1
                             [0.5, 0.5, 0.0],   # image 1: tie with image 0 -> rank 2 (pessimistic)
                             [0.0, 0.3, 0.2],   # image 2: image 1 higher -> rank 2
                             [0.0, 0.0, 0.1]])  # image 2: rank 1
    text_image = torch.tensor([0, 0, 1, 2, 2])
    t2i, i2t = retrieval_ranks(image_emb, text_emb, text_image)
    assert t2i.tolist() == [2, 1, 2, 2, 1]
    # image 0: best own caption t1 (0.8) beats all -> 1 (its other caption t0 alone would rank 3);
    # image 1: t0 (0.9) beats t2 (0.5) -> 2; image 2: best own t3 (0.2) -> 1
    assert i2t.tolist() == [1, 2, 1]
    m = metrics_from_ranks(t2i, i2t, ks=(1, 2, 5), n_images=3, n_texts=5)
    assert m["text_to_image_R@1"] == pytest.approx(0.4)
    assert m["text_to_image_R@2"] == 1.0
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["text_to_image_rank_median"] == 2.0 and m["text_to_image_rank_mean"] == pytest.approx(1.6)
    assert (m["text_to_image_rank_q1"], m["text_to_image_rank_q3"]) == (1.0, 2.0)
    assert (m["n_images"], m["n_texts"]) == (3, 5)
    # an image without any caption is a gallery distractor, not an image->text query
    t2i, i2t = retrieval_ranks(torch.eye(4), F.pad(text_emb, (0, 1)), text_image)
    assert t2i.tolist() == [2, 1, 2, 2, 1] and i2t.tolist() == [1, 2, 1]


def test_rank_stats_one_based_known_ordering():
    ranks = torch.tensor([5, 1, 8, 3, 2, 7, 4, 6])  # 1..8 shuffled
    s = rank_stats(ranks)
    assert s == {"mean": 4.5, "median": 4.5, "q1": 2.75, "q3": 6.25}
    assert s["q1"] == np.percentile(ranks.numpy(), 25) and s["q3"] == np.percentile(ranks.numpy(), 75)
    assert rank_stats(torch.tensor([3, 1, 2]))["median"] == 2.0
    with pytest.raises(ValueError):
        rank_stats(torch.tensor([], dtype=torch.long))


def test_recall_monotone_and_matches_argsort_reference():
    g = torch.Generator().manual_seed(0)
    image_emb = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    text_emb = F.normalize(torch.randn(70, 8, generator=g), dim=-1)
    text_image = torch.randint(0, 30, (70,), generator=g)
    t2i, i2t = retrieval_ranks(image_emb, text_emb, text_image, chunk=16)
    # reference: position of the correct image in a full descending sort (no ties in random floats)
    order = (text_emb @ image_emb.T).argsort(dim=1, descending=True)
    ref = (order == text_image[:, None]).float().argmax(dim=1) + 1
    assert torch.equal(t2i, ref)
    recalls = list(accuracy_at_k(t2i, range(1, 31)).values())
    assert all(a <= b for a, b in zip(recalls, recalls[1:])) and recalls[-1] == 1.0
    recalls = list(accuracy_at_k(i2t, range(1, 71)).values())
    assert all(a <= b for a, b in zip(recalls, recalls[1:])) and recalls[-1] == 1.0


def test_chance_level_and_k_cap():
    assert list(curve_ks(9)) == list(range(1, 10)) and list(curve_ks(267)) == list(range(1, 11))
    assert chance_at_k([1, 5, 10], 9) == {1: 1 / 9, 5: 5 / 9, 10: 1.0}
    # random scores over K = 20 candidates reach the chance level k / K
    g = torch.Generator().manual_seed(0)
    correct = torch.zeros(20000, 20, dtype=torch.bool)
    correct[:, 0] = True
    acc = accuracy_at_k(ranks_from_scores(torch.randn(20000, 20, generator=g), correct), [1, 5, 10])
    for k, chance in chance_at_k([1, 5, 10], 20).items():
        assert acc[k] == pytest.approx(chance, abs=0.01)


def test_charts_chance_line_axis_labels_legend_outside(tmp_path):
    from clip.eval.charts import plot_accuracy_at_k, plot_rank_boxplot

    curves = {"en": {"1": 0.2, "2": 0.5, "3": 1.0}, "ko": {"1": 0.4, "2": 0.6, "3": 1.0}}
    fig = plot_accuracy_at_k(curves, tmp_path / "acc.png", "zero-shot", chance_at_k([1, 2, 3], 3),
                             "chance k/3 (classes)", "top-k accuracy")
    ax = fig.axes[0]
    (line,) = ax.lines
    assert line.get_label() == "chance k/3 (classes)" and list(line.get_ydata()) == [1 / 3, 2 / 3, 1.0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("k", "top-k accuracy")
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0  # below the axes
    fig = plot_rank_boxplot({"en t->i": torch.tensor([1, 2, 9]), "ko": torch.tensor([3, 4])}, tmp_path / "r.png", "r")
    ax = fig.axes[0]
    assert ax.get_ylabel().startswith("rank") and ax.get_yscale() == "log"
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    assert _is_png(tmp_path / "acc.png") and _is_png(tmp_path / "r.png")


# ----------------------------------------------------------------------------- synthetic zero-shot

class FakeTokenizer:
    """Each distinct text becomes one id; the fake model looks the text up again."""

    def __init__(self):
        self.texts: list[str] = []

    def encode_batch(self, texts, context_length=None):
        ids = []
        for t in texts:
            if t not in self.texts:
                self.texts.append(t)
            ids.append(self.texts.index(t))
        return torch.tensor(ids)[:, None]  # (B, 1)

    def normalize(self, text):
        return text.strip().lower()


class FakeModel(torch.nn.Module):
    """encode_image = the (B, E, 1, 1) image flattened; encode_text = a table of NON-normalised vectors."""

    def __init__(self, tokenizer, table):
        super().__init__()
        self.tokenizer, self.table = tokenizer, table

    def encode_image(self, images):
        return images.flatten(1)

    def encode_text(self, tokens):
        return torch.stack([torch.tensor(self.table[self.tokenizer.texts[i]], dtype=torch.float)
                            for i in tokens[:, 0].tolist()])


def _fake():
    table = {}
    for c, name in enumerate(["cat", "dog", "car"]):
        table[f"a photo of a {name}."] = (2 * F.one_hot(torch.tensor(c), 3)).tolist()  # norm 2
        table[f"a {name}."] = F.one_hot(torch.tensor((c + 1) % 3), 3).tolist()  # norm 1
        table[f"{'고양이 개 자동차'.split()[c]} 사진"] = F.one_hot(torch.tensor((c + 1) % 3), 3).tolist()
    tok = FakeTokenizer()
    return FakeModel(tok, table), tok


def test_prompt_ensembling_is_mean_of_normalised_renormalised():
    model, tok = _fake()
    clf = zeroshot_classifier(model, tok, ["cat", "dog"], ["a photo of a {}.", "a {}."])
    s = 2 ** -0.5
    # mean([1,0,0], [0,1,0]) renormalised; without normalising first it would be ~[0.894, 0.447, 0]
    assert torch.allclose(clf, torch.tensor([[s, s, 0.0], [0.0, s, s]]), atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot_classifier(model, tok, ["cat"], ["no placeholder"])


def test_zeroshot_known_answer_exact_acc1():
    model, tok = _fake()
    e = torch.eye(3)
    # en classifier (template "a photo of a {}."): class c = e_c. ko ("{} 사진"): class c = e_{c+1}.
    images = [e[0], e[1], e[2], e[2]]
    labels = ["cat", "dog", "car", "cat"]  # the last image looks like a car: wrong in en
    samples = [{"image": x.view(3, 1, 1), "label": y, "key": str(i)}
               for i, (x, y) in enumerate(zip(images, labels))]
    model.train()
    res = evaluate_zeroshot(model, tok, samples, ["cat", "dog", "car"],
                            {"en": ["cat", "dog", "car"], "ko": ["고양이", "개", "자동차"]},
                            {"en": ["a photo of a {}."], "ko": ["{} 사진"]}, return_ranks=True)
    assert model.training  # restored after the evaluation
    assert res["languages"]["en"]["acc1"] == 0.75
    # ko: image e0 -> class whose vector is e0 = car (c=2); e1 -> cat; e2 -> dog: all wrong
    assert res["languages"]["ko"]["acc1"] == 0.0
    assert res["ranks"]["en"].tolist() == [1, 1, 1, 3]  # cat scores 0 on e2, tied with dog -> last
    assert res["languages"]["en"]["accuracy_at_k"]["2"] == 0.75 and res["languages"]["en"]["acc5"] == 1.0
    assert res["languages"]["en"]["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(ValueError, match="'cow'"):
        evaluate_zeroshot(model, tok, samples[:1] + [{"image": e[0].view(3, 1, 1), "label": "cow"}],
                          ["cat", "dog", "car"], {"en": ["cat", "dog", "car"]}, {"en": ["a {}."]})


def test_evaluate_retrieval_and_crosslingual_fake():
    model, tok = _fake()
    e = torch.eye(3)
    samples = [{"image": e[c].view(3, 1, 1), "en": f"a photo of a {n}.", "captions": None}
               for c, n in enumerate(["cat", "dog", "car"])]
    samples[2]["en"] = ["a photo of a car.", "a car."]  # a second caption (pointing at image 0)
    samples.append({"image": e[0].view(3, 1, 1), "en": "  "})  # no valid caption: dropped
    res = evaluate_retrieval(model, tok, samples, ["en", "ko"], return_ranks=True)
    en = res["languages"]["en"]
    assert (res["n_images"], res["n_no_caption"], en["n_texts"]) == (3, 1, 4)
    assert res["languages"]["ko"] == {"n_texts": 0}
    assert res["ranks"]["en"]["text_to_image"].tolist() == [1, 1, 1, 3]
    # image 0's caption ties with image 2's "a car." (both e0): pessimistic rank 2
    assert res["ranks"]["en"]["image_to_text"].tolist() == [2, 1, 1]
    assert en["image_to_text_R@1"] == pytest.approx(2 / 3) and en["text_to_image_R@1"] == 0.75
    flat = flatten_metrics(res, "val/")
    assert flat["val/en/text_to_image_R@1"] == 0.75 and flat["val/n_images"] == 3
    assert flat["val/en/text_to_image_accuracy_at_k/3"] == 1.0 and "val/ties" not in flat
    pairs = [("a photo of a cat.", "고양이 사진"), ("a photo of a dog.", "개 사진")]
    # "고양이 사진" = e1 = "a photo of a dog." -> the en->ko mapping is swapped: ranks 2
    x = evaluate_crosslingual(model, tok, pairs, ("en", "ko"))
    assert x["directions"]["en_to_ko"]["R@1"] == 0.0
    assert x["directions"]["ko_to_en"]["rank_median"] == 2.0


# ----------------------------------------------------------------------------- CLI on a tiny CLIP

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, make_tiny_clip_run, data_dir):
    root = tmp_path_factory.mktemp("eval")
    run = make_tiny_clip_run(root / "run", fingerprint=False)
    rows = [json.loads(line) for line in open(data_dir / "emoji" / "captions.jsonl", encoding="utf-8")][::80]
    for r in rows:
        r["file"] = str(data_dir / "emoji" / r["file"])
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    rows.append({**rows[0], "key": "bad", "file": "bad.png", "base": "bad"})
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    names = root / "groups.json"
    names.write_text(json.dumps({"en": {g: g.lower() for g in GROUPS_KO}, "ko": GROUPS_KO},
                                ensure_ascii=False))
    return {"root": root, "run": run, "manifest": manifest, "rows": rows, "names": names}


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_zeroshot_schema(tiny_run, capsys):
    out = tiny_run["root"] / "out_zs"
    rc = main(["zeroshot", "--checkpoint", str(tiny_run["run"]), "--data", str(tiny_run["manifest"]),
               "--label-field", "group", "--classnames", str(tiny_run["names"]), "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "metrics_zeroshot.json").read_text(encoding="utf-8"))
    assert (d["task"], d["n_images"], d["n_skipped"]) == ("zeroshot", 20, 1)
    assert (d["rank_base"], d["ties"], d["classnames"]) == (1, "pessimistic", str(tiny_run["names"]))
    for lang in ("en", "ko"):
        s = d["languages"][lang]
        assert 0.0 <= s["acc1"] <= s["acc5"] <= 1.0 and s["n_classes"] == 9
        # accuracy@k stops at k = C = 9 classes (beyond it is 1 by construction)
        assert list(s["accuracy_at_k"]) == [str(k) for k in range(1, 10)] and s["accuracy_at_k"]["9"] == 1.0
        assert 1.0 <= s["rank_q1"] <= s["rank_median"] <= s["rank_q3"] <= 9.0
    assert d["templates"]["ko"][0] == "{} 사진"
    assert all(_is_png(out / c) for c in d["charts"])
    assert "acc1" in capsys.readouterr().out


def test_cli_retrieval_schema_and_val_split(tiny_run):
    from clip.data.pairs import split_rows

    out = tiny_run["root"] / "out_ret"
    rc = main(["retrieval", "--checkpoint", str(tiny_run["run"] / "clip_ckpt.pt"), "--manifest",
               str(tiny_run["manifest"]), "--out", str(out), "--batch-size", "7"])
    assert rc == 0
    d = json.loads((out / "metrics_retrieval.json").read_text(encoding="utf-8"))
    assert (d["n_images"], d["n_skipped"], d["rank_base"]) == (20, 1, 1)
    for lang in ("en", "ko"):
        s = d["languages"][lang]
        for k in (1, 5, 10):
            assert isinstance(s[f"text_to_image_R@{k}"], float)
            assert isinstance(s[f"image_to_text_R@{k}"], float)
        r = [s[f"text_to_image_R@{k}"] for k in (1, 5, 10)]
        assert r == sorted(r)
        for name in ("text_to_image", "image_to_text"):
            assert 1 <= s[f"{name}_rank_q1"] <= s[f"{name}_rank_median"] <= s[f"{name}_rank_q3"] <= 20
            assert 1 <= s[f"{name}_rank_mean"] <= 20
        assert list(s["text_to_image_accuracy_at_k"]) == [str(k) for k in range(1, 11)]
        assert s["text_to_image_accuracy_at_k"]["5"] == s["text_to_image_R@5"]
    assert all(_is_png(out / c) for c in d["charts"])
    # held-out split: exactly the rows split_rows puts in val, never a train row
    _, val = split_rows(tiny_run["rows"], 0.5, key_field="base", seed=0)
    rc = main(["retrieval", "--checkpoint", str(tiny_run["run"]), "--manifest", str(tiny_run["manifest"]),
               "--out", str(out), "--split", "val", "--val-fraction", "0.5", "--languages", "ko"])
    assert rc == 0
    d = json.loads((out / "metrics_retrieval.json").read_text(encoding="utf-8"))
    n_bad = sum(r["key"] == "bad" for r in val)
    assert d["split"]["n_rows"] == len(val) and 0 < len(val) < 21
    assert (d["n_images"], d["n_skipped"]) == (len(val) - n_bad, n_bad) and list(d["languages"]) == ["ko"]


def test_cli_crosslingual_dedupes(tiny_run):
    pairs = tiny_run["root"] / "pairs.tsv"
    lines = ["en\tko\tsource", "Open\t열기\tx", "Close\t닫기\tx", "open\t열기 (2)\tx", "Save\t닫기\tx",
             "Quit\t\tx", "Print\t인쇄\tx", "Help\t도움말\tx"]
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tiny_run["root"] / "out_x"
    rc = main(["crosslingual", "--checkpoint", str(tiny_run["run"]), "--pairs", str(pairs),
               "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "metrics_crosslingual.json").read_text(encoding="utf-8"))
    # "open" repeats "Open" after lowercasing, "Save" repeats the ko "닫기", "Quit" has no ko
    assert (d["n_pairs"], d["n_dropped_duplicates"], d["rank_base"]) == (4, 3, 1)
    for name in ("en_to_ko", "ko_to_en"):
        s = d["directions"][name]
        assert s["R@1"] <= s["R@5"] == 1.0 == s["R@10"] and 1 <= s["rank_median"] <= 4
    assert all(_is_png(out / c) for c in d["charts"])


def test_cli_image_folder_with_tsv_classnames(tiny_run, data_dir):
    folder = tiny_run["root"] / "folder"
    for cls, keys in {"medal": ["1f947", "1f948"], "flag": ["1f3c1"]}.items():
        (folder / cls).mkdir(parents=True)
        for k in keys:
            shutil.copy(data_dir / "emoji" / "img" / f"{k}.png", folder / cls / f"{k}.png")
    names = tiny_run["root"] / "names.tsv"
    names.write_text("label\ten\tko\nmedal\tmedal\t메달\nflag\tflag\t깃발\ncat\tcat\t고양이\n", encoding="utf-8")
    out = tiny_run["root"] / "out_folder"
    assert main(["zeroshot", "--checkpoint", str(tiny_run["run"]), "--data", str(folder), "--classnames",
                 str(names), "--out", str(out)]) == 0
    d = json.loads((out / "metrics_zeroshot.json").read_text(encoding="utf-8"))
    assert d["n_images"] == 3 and d["languages"]["ko"]["n_classes"] == 3


@pytest.mark.parametrize("case", ["missing_file", "unknown_label", "missing_language"])
def test_cli_bad_input_exit_2_one_line(tiny_run, capsys, case):
    names = tiny_run["root"] / f"{case}.json"
    if case == "unknown_label":
        ko = {g: n for g, n in GROUPS_KO.items() if g != "Flags"}
        names.write_text(json.dumps({"en": {g: g for g in ko}, "ko": ko}, ensure_ascii=False))
    elif case == "missing_language":
        names.write_text(json.dumps({"en": {g: g for g in GROUPS_KO}}))
    rc = main(["zeroshot", "--checkpoint", str(tiny_run["run"]), "--data", str(tiny_run["manifest"]),
               "--label-field", "group", "--classnames", str(names), "--out", str(tiny_run["root"] / "bad")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("clip.eval: error:") and err.count("\n") == 1 and "Traceback" not in err
    expected = {"missing_file": "not found", "unknown_label": "'Flags'", "missing_language": "['ko']"}
    assert expected[case] in err


def _heldout_inputs(tiny_run):
    from mae.images.transforms import eval_transform
    from clip.model import load_clip
    from mae.images.sources import iter_manifest
    from tokenizer import BilingualTokenizer

    model = load_clip(tiny_run["run"] / "clip_ckpt.pt")
    tok = BilingualTokenizer.from_dir(tiny_run["run"] / "tokenizer")
    rows = list(iter_manifest(tiny_run["manifest"]))  # 20 images + 1 undecodable
    return model, tok, rows, eval_transform(model.cfg.vision.img_size)


def test_evaluate_heldout_matches_cli_and_reference_loss(tiny_run):
    from clip.data.pairs import extract_captions
    from mae.images.decode import load_rgb
    from clip.model.loss import ClipLoss

    model, tok, rows, tf = _heldout_inputs(tiny_run)
    model.train()
    res = evaluate_heldout(model, tok, rows, ["en", "ko"], "cpu", transform=tf, loss_batch_size=8)
    assert model.training  # restored after the call
    out = tiny_run["root"] / "out_heldout"
    assert main(["retrieval", "--checkpoint", str(tiny_run["run"]), "--manifest", str(tiny_run["manifest"]),
                 "--out", str(out)]) == 0
    d = json.loads((out / "metrics_retrieval.json").read_text(encoding="utf-8"))["languages"]
    expected = {f"{lang}/{name}_R@{k}": d[lang][f"{name}_R@{k}"]
                for lang in ("en", "ko") for name in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert {k: v for k, v in res.items() if k != "loss"} == expected  # exactly the CLI's figures

    # reference loss: each image's first caption per language, the 20 images as 8 + 8 of a seeded
    # permutation (the short last 4 dropped), the mean of the two batch losses
    good = [r for r in rows if r["key"] != "bad"]
    caps = [extract_captions(r, ["en", "ko"])[0] for r in good]
    mask = torch.tensor([[lang in c for lang in ("en", "ko")] for c in caps])  # (20, 2)
    tokens = tok.encode_batch([c.get(lang, ["-"])[0] for c in caps for lang in ("en", "ko")],
                              context_length=model.cfg.text.context_length).view(20, 2, -1)  # (20, 2, T)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(load_rgb(r["path"])) for r in good]))  # (20, E)
        txt = model.encode_captions(tokens, mask)  # (20, 2, E)
        perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
        ref = sum(ClipLoss()(img[c][None], txt[c], mask[c], model.scale()) for c in (perm[:8], perm[8:16])) / 2
    assert res["loss"] == pytest.approx(float(ref), rel=1e-4)
    # one batch larger than the set: the whole set is the only (short) batch, kept
    whole = evaluate_heldout(model, tok, rows, ["en", "ko"], "cpu", transform=tf, loss_batch_size=64)
    with torch.no_grad():
        assert whole["loss"] == pytest.approx(float(ClipLoss()(img[None], txt, mask, model.scale())), rel=1e-4)
    assert not model.training


def test_evaluate_heldout_bf16_model(tiny_run):
    model, tok, rows, tf = _heldout_inputs(tiny_run)
    ref = evaluate_heldout(model, tok, rows, ["en", "ko"], "cpu", transform=tf, loss_batch_size=8, ks=(1, 5))
    res = evaluate_heldout(model.to(torch.bfloat16), tok, rows, ["en", "ko"], "cpu", transform=tf,
                           loss_batch_size=8, ks=(1, 5))
    assert list(res) == list(ref) == ["loss"] + [f"{lang}/{name}_R@{k}" for lang in ("en", "ko")
                                                 for name in ("text_to_image", "image_to_text") for k in (1, 5)]
    assert all(isinstance(v, float) for v in res.values())
    assert res["loss"] == pytest.approx(ref["loss"], abs=0.05)
