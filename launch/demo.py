"""The end-to-end demo on the bundled bilingual data: tokenizer -> MAE -> CLIP -> evaluation.

    python -m launch.demo [--out runs/demo] [--nproc 1]

Each stage runs exactly as a user would run it (the commands are printed), with the small demo
presets in ``configs/demo/`` so that a 2-core CPU finishes in about 3 minutes (the first DeepSpeed
launch of a machine adds ~1 min to compile its comm op). It ends with a table of English and
Korean figures on the held-out emoji (never trained on) and the paths of the charts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launch.runtime.dist import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], title: str) -> float:
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"demo: '{title}' failed with exit code {r.returncode}")
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="folder for every stage's outputs (default %(default)s)")
    p.add_argument("--nproc", type=int, default=1, help="DeepSpeed ranks per stage (CPU: 1 rank x 2 threads is fastest)")
    args = p.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
    py, times = sys.executable, {}
    ds = [str(Path(py).with_name("deepspeed")), "--num_gpus", str(args.nproc)]
    times["tokenizer"] = run([py, "-m", "tokenizer.train", "--corpus", "data/corpus/en.txt", "data/corpus/ko.txt",
                              "--vocab-size", "16384", "--out", str(out / "tokenizer")], "1/4 bilingual BPE tokenizer")
    times["mae"] = run(ds + ["--master_port", str(free_port()), "launch/mae.py", "--config", "configs/demo/mae.yaml",
                             f"run.out_dir={out / 'mae'}"], "2/4 MAE pretraining of the image encoder")
    times["clip"] = run(ds + ["--master_port", str(free_port()), "launch/clip.py", "--init", str(out / "mae" / "mae_ckpt.pt"),
                              "--config", "configs/demo/clip.yaml", f"run.out_dir={out / 'clip'}",
                              f"data.tokenizer={out / 'tokenizer'}"], "3/4 bilingual CLIP from the MAE encoder")
    ev = [py, "-m", "clip.eval"]
    ckpt, res = ["--checkpoint", str(out / "clip"), "--out", str(out / "eval")], ["--split", "val", "--no-progress"]
    t = run(ev + ["retrieval"] + ckpt + res + ["--data", "data/emoji/captions.jsonl"], "4/4 evaluation: retrieval")
    t += run(ev + ["zeroshot"] + ckpt + res + ["--data", "data/emoji/captions.jsonl", "--label-field", "group",
                                               "--classnames", "data/emoji/classnames_group.json"], "4/4 evaluation: zero-shot")
    t += run(ev + ["crosslingual"] + ckpt + ["--pairs", "data/parallel/en_ko.tsv", "--no-progress"],
             "4/4 evaluation: cross-lingual")
    times["eval"] = t
    summary(out, times)


def summary(out: Path, times: dict) -> None:
    ev = out / "eval"
    r = json.loads((ev / "metrics_retrieval.json").read_text(encoding="utf-8"))
    z = json.loads((ev / "metrics_zeroshot.json").read_text(encoding="utf-8"))
    x = json.loads((ev / "metrics_crosslingual.json").read_text(encoding="utf-8"))
    n = r["n_images"]
    print(f"\n=== held-out emoji ({n} images never trained on; chance R@1 = {1 / n:.2%}, "
          f"zero-shot over {next(iter(z['languages'].values()))['n_classes']} emoji groups)")
    print(f"{'':4} {'image->text R@1':>15} {'R@5':>7} {'text->image R@1':>15} {'R@5':>7} {'median rank':>11} "
          f"{'zero-shot top-1':>15}")
    for lang, s in r["languages"].items():
        zs = z["languages"].get(lang, {})
        print(f"{lang:4} {s['image_to_text_R@1']:>15.2%} {s['image_to_text_R@5']:>7.2%} "
              f"{s['text_to_image_R@1']:>15.2%} {s['text_to_image_R@5']:>7.2%} "
              f"{s['text_to_image_rank_median']:>11.0f} {zs.get('acc1', float('nan')):>15.2%}")
    for name, s in x["directions"].items():
        print(f"cross-lingual {name}: R@1 {s['R@1']:.2%}, R@5 {s['R@5']:.2%} over {x.get('n_pairs')} pairs")
    print("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    pngs = sorted(str(p) for p in out.glob("mae/*.png")) + sorted(str(p) for p in out.glob("mae/recon/*.png"))[-1:] + \
        sorted(str(p) for p in [*out.glob("clip/*.png"), *ev.glob("*.png")])
    print("charts:\n  " + "\n  ".join(pngs))


if __name__ == "__main__":
    main()
