"""Unfreezing with and without a re-warm: the loss right after pretrained towers leave their freeze
window, on a transformers text tower and a timm ViT (both frozen for the first steps), bf16, ZeRO-2.

Builds a small random XLM-R (the project's test helper) and a small timm ViT, first trains them
briefly as a CLIP so that they are "pretrained" for these captions, then starts a CLIP run from
them with both towers frozen for ``--window`` steps, once with ``freeze.rewarm_steps=0`` (the full
rate at once) and once with ``--rewarm``, and prints the loss around the unfreezing: the level
before it (the mean of the window's last 5 logged losses) and the highest after it, over the
next ``--after`` steps, as a ratio.

    python bench/rewarm.py [--window 30] [--after 20] [--rewarm 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "launch" / "clip.py"), "--config", str(ROOT / "configs" / "clip_tiny.yaml"),
           f"run.out_dir={out}", "run.log_every=1", "val_every=0", "train.num_workers=0", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]


def measure(window: int, after: int, rewarms: list[int], pretrain: int, lr: float, batch: int) -> dict[int, dict]:
    """``{rewarm: {"before", "first5", "highest", "losses"}}``: the loss level before the towers are
    released (the mean of the window's last 5 steps), the mean of the 5 steps after, the highest
    after, and every step's loss."""
    import torch
    from transformers import AutoModel

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_tiny import save_tiny_xlmr

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        xlmr = save_tiny_xlmr(tmp / "xlmr", hidden=64, layers=2)
        tower = ["model.text_tower=hf", f"model.hf_text.path={xlmr}", "model.vision.pre_norm=true",
                 "train.precision=bf16", "train.zero_stage=2", "freeze.image_steps=0"]
        # pretraining: both towers train; then the image tower goes out as a timm ViT state dict and
        # the text encoder back into its folder
        run(tower + [f"train.steps={pretrain}"], tmp / "pre")
        state = torch.load(tmp / "pre" / "clip_ckpt.pt", weights_only=True)["model"]
        torch.save({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}, tmp / "vit.pt")
        enc = AutoModel.from_pretrained(str(xlmr), local_files_only=True, add_pooling_layer=False)
        enc.load_state_dict({k[len("text.model."):]: v for k, v in state.items() if k.startswith("text.model.")})
        enc.save_pretrained(xlmr)
        steps = window + after
        common = tower + ["--init", str(tmp / "vit.pt"), f"train.steps={steps}", f"freeze.image_steps={window}",
                          f"freeze.text_steps={window}", "train.warmup_steps=5", f"train.lr={lr}",
                          f"train.micro_batch_size={batch}"]
        for rewarm in rewarms:
            rows = run(common + [f"freeze.rewarm_steps={rewarm}"], tmp / f"r{rewarm}")
            loss = {r["step"]: r["train/loss"] for r in rows}
            out[rewarm] = {"before": sum(loss[s] for s in range(window - 4, window + 1)) / 5,
                           "first5": sum(loss[s] for s in range(window + 1, window + 6)) / 5,
                           "highest": max(loss[s] for s in range(window + 1, steps + 1)), "losses": loss}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--after", type=int, default=20)
    ap.add_argument("--rewarm", type=int, default=10)
    ap.add_argument("--pretrain", type=int, default=150, help="steps that make the towers 'pretrained'")
    ap.add_argument("--lr", type=float, default=5e-3, help="the run's peak lr (a high one shows the shock)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    res = measure(args.window, args.after, [0, args.rewarm], args.pretrain, args.lr, args.batch)
    for rewarm, r in res.items():
        around = [round(r["losses"][s], 3) for s in range(args.window - 2, args.window + 8)]
        print(f"rewarm {rewarm:>3}: loss before unfreezing {r['before']:.4f} (mean of 5), after: mean of the first 5 "
              f"{r['first5']:.4f} ({r['first5'] / r['before']:.3f}x), highest {r['highest']:.4f} "
              f"({r['highest'] / r['before']:.3f}x); steps {args.window - 2}..{args.window + 7}: {around}")


if __name__ == "__main__":
    main()
