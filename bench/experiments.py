"""Run a pair (or more) of CLIP recipes on the bundled emoji and compare them on the held-out split.

    python bench/experiments.py configs/experiments/languages.yaml --out runs/exp/languages
    python bench/experiments.py configs/experiments/mae_init.yaml --out runs/exp/mae_init \\
        --tokenizer runs/tokenizer --mae-ckpt runs/exp/mae/mae_ckpt.pt

An experiment file names the MAE and CLIP presets and the runs, each ``{init: mae|none|PATH,
overrides: {dotted.key: value}}`` (a PATH is handed to ``--init``: an MAE export or a timm ViT
state dict), and optionally ``eval_languages`` (default en, ko; a language a run did not train on
is evaluated all the same) and ``eval_manifest`` (evaluated whole instead of the training
manifest's held-out split). The MAE stage is trained once (or ``--mae-ckpt`` reuses one)
and shared by every ``init: mae`` run; each run is ``deepspeed --num_gpus N launch/clip.py``.
A run folder that already holds ``clip_ckpt.pt`` is reused (delete it to retrain). Every run is
then evaluated with :func:`clip.eval.tasks.evaluate_retrieval` on the held-out split (``split_rows``,
the same rows as training's validation) in English and Korean, whatever languages it trained on.
Writes ``<out>/results.json``, ``<out>/results.md`` (side-by-side table) and ``<out>/results.png``
(bars per language and metric).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = [("image_to_text_R@1", "i->t R@1"), ("image_to_text_R@5", "i->t R@5"),
           ("text_to_image_R@1", "t->i R@1"), ("text_to_image_R@5", "t->i R@5")]
LANGS = ("en", "ko")


def _flat(overrides: dict) -> list[str]:
    return [f"{k}={json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v}"
            for k, v in (overrides or {}).items()]


def _launch(script: str, args: list[str], gpus: int, log: Path) -> float:
    """One ``deepspeed`` run; returns its wall time. Exits 2 with the log's tail on failure."""
    from launch.runtime.dist import free_port

    port = free_port()
    exe = Path(sys.executable).parent / "deepspeed"
    cmd = [str(exe) if exe.exists() else "deepspeed", "--num_gpus", str(gpus), "--master_port", str(port),
           str(ROOT / "launch" / script), *args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ}).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        sys.exit(f"error: {script} failed (exit {rc}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def evaluate(run_dir: Path, manifest: str, val_fraction: float, split_key: str, split_seed: int,
             whole: bool = False) -> dict:
    """Held-out retrieval per language of one run folder (clip_ckpt.pt + tokenizer/)."""
    from clip.data.pairs import split_rows
    from clip.eval.tasks import evaluate_retrieval
    from clip.model.checkpoint import load_clip_and_tokenizer
    from mae.images.sources import iter_manifest

    rows = list(iter_manifest(manifest))
    val = rows if whole else split_rows(rows, val_fraction, split_key, split_seed)[1]
    model, tok = load_clip_and_tokenizer(run_dir)
    res = evaluate_retrieval(model, tok, val, LANGS, "cpu")
    out = {"n_images": res["n_images"], "chance@1": 1.0 / res["n_images"], "chance@5": 5.0 / res["n_images"]}
    for lang in LANGS:
        sec = res["languages"][lang]
        out[lang] = {k: sec[k] for k, _ in METRICS + [("text_to_image_rank_median", "")]} if sec["n_texts"] else None
    return out


def write_report(results: dict, out: Path, title: str) -> None:
    runs = list(results["runs"])
    n = next(iter(results["runs"].values()))["eval"]["n_images"]
    lines = [f"# {title}", "", f"Held-out split: {n} emoji never trained on; chance R@1 = {100 / n:.2f} %, "
             f"R@5 = {500 / n:.2f} %. Values in %.", "",
             "| language | metric | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for lang in LANGS:
        for key, name in METRICS:
            vals = [100 * (results["runs"][r]["eval"][lang] or {}).get(key, float("nan")) for r in runs]
            lines.append(f"| {lang} | {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    lines += ["", "| run | init | overrides | CLIP wall s |", "|---|---|---|---|"]
    for r in runs:
        info = results["runs"][r]
        wall = "reused" if info["wall_s"] is None else f"{info['wall_s']:.0f}"
        lines.append(f"| {r} | {info['init']} | {' '.join(info['overrides']) or '-'} | {wall} |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LANGS), figsize=(5 * len(LANGS), 3.6), dpi=100, sharey=True)
    width = 0.8 / len(runs)
    for ax, lang in zip(axes, LANGS):
        for i, r in enumerate(runs):
            vals = [100 * (results["runs"][r]["eval"][lang] or {}).get(k, float("nan")) for k, _ in METRICS]
            ax.bar([j + i * width for j in range(len(METRICS))], vals, width, label=r)
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(METRICS))], [m for _, m in METRICS])
        ax.axhline(100 / n, color="gray", ls=":", lw=1, label="chance R@1")
        ax.set_title(f"held-out {lang}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "results.png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("experiment", help="configs/experiments/*.yaml")
    p.add_argument("--out", required=True, help="folder for the runs and results.{json,md,png}")
    p.add_argument("--tokenizer", default="runs/tokenizer", help="tokenizer folder (data.tokenizer)")
    p.add_argument("--mae-ckpt", default=None, help="reuse this mae_ckpt.pt instead of training the MAE preset")
    p.add_argument("--gpus", type=int, default=1,
                   help="processes per run (deepspeed --num_gpus); 1 as in the demo: more processes multiply the global batch")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every CLIP run")
    args = p.parse_args(argv)
    exp = yaml.safe_load(Path(args.experiment).read_text(encoding="utf-8"))
    if not isinstance(exp, dict) or not isinstance(exp.get("runs"), dict) or not exp["runs"]:
        print(f"error: {args.experiment}: expected 'mae', 'clip' and a mapping 'runs'", file=sys.stderr)
        return 2
    global LANGS
    LANGS = tuple(exp.get("eval_languages", LANGS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mae_ckpt = args.mae_ckpt
    if mae_ckpt is None and any(r.get("init", "mae") == "mae" for r in exp["runs"].values()):
        mae_dir = out / "mae"
        if not (mae_dir / "mae_ckpt.pt").is_file():
            _launch("mae.py", ["--config", str(ROOT / exp["mae"]), f"run.out_dir={mae_dir}"], args.gpus,
                    out / "mae.log")
        mae_ckpt = str(mae_dir / "mae_ckpt.pt")
    clip_cfg = yaml.safe_load((ROOT / exp["clip"]).read_text(encoding="utf-8"))
    data = clip_cfg.get("data", {})
    manifest = str(ROOT / data.get("source", "data/emoji/captions.jsonl"))
    results = {"experiment": args.experiment, "mae_ckpt": mae_ckpt, "runs": {}}
    for name, spec in exp["runs"].items():
        run_dir = out / name
        overrides = _flat(spec.get("overrides")) + list(args.set)
        wall = None  # None: an existing run folder was reused
        if not (run_dir / "clip_ckpt.pt").is_file():
            kind = spec.get("init", "mae")
            init = ["--init", mae_ckpt] if kind == "mae" else [] if kind == "none" else ["--init", kind]
            wall = _launch("clip.py", [*init, "--config", str(ROOT / exp["clip"]), f"run.out_dir={run_dir}",
                                       f"data.tokenizer={args.tokenizer}", *overrides], args.gpus, out / f"{name}.log")
        elif (out / "results.json").is_file():
            wall = json.loads((out / "results.json").read_text()).get("runs", {}).get(name, {}).get("wall_s")
        results["runs"][name] = {"init": spec.get("init", "mae"), "overrides": overrides, "wall_s": wall,
                                 "eval": evaluate(run_dir, exp.get("eval_manifest", manifest), data.get("val_fraction", 0.15),
                                                  data.get("split_key", "base"), data.get("split_seed", 0),
                                                  whole="eval_manifest" in exp)}
        print(name, json.dumps(results["runs"][name]["eval"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    write_report(results, out, Path(args.experiment).stem)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
