"""Train-step throughput of our ViT-B/32 MAE against Hugging Face's ``ViTMAEForPreTraining``.

Both models are built with the same sizes (ViT-B/32 encoder at 224 px, 8 x 512 decoder with 16
heads, ratio 0.75, norm-pix loss), randomly initialised (nothing is downloaded), and trained on the
same random batch in fp32 with AdamW: warmup steps, then timed steps of forward + backward + step.
Each model runs in a fresh subprocess so that its peak memory is its own (ru_maxrss on CPU,
``torch.cuda.max_memory_allocated`` on CUDA); ``--rounds`` alternates the two models, and the
ratio compares each model's fastest step, which is what survives noisy neighbours best.

``ours_ckpt`` adds activation checkpointing (encoder and decoder), ``ours_compile`` runs
``model.compile()``; ``--precision bf16`` runs every model under ``torch.autocast`` (fp32 weights).
MFU: ``launch/runtime/perf.py`` (model FLOPs of a plain step, without recomputation / time / peak).

    python bench/mae_speed.py --batch-size 32 --steps 5 --threads 2
    python bench/mae_speed.py --device cuda --batch-size 256 --steps 20 --precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time


import torch

from launch.runtime.perf import peak_tflops, step_flops

MODELS = ("ours", "ours_ckpt", "ours_compile", "hf")


def build(name: str):
    """The model and a function batch -> loss."""
    if name.startswith("ours"):
        from mae.model import MAEConfig, MaskedAutoencoder

        model = MaskedAutoencoder(MAEConfig())
        return model, (lambda x: model(x)[0]), "timm Block, F.scaled_dot_product_attention"
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        image_size=224, patch_size=32, num_channels=3, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, decoder_hidden_size=512,
        decoder_num_hidden_layers=8, decoder_num_attention_heads=16, decoder_intermediate_size=2048,
        mask_ratio=0.75, norm_pix_loss=True, layer_norm_eps=1e-6, qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "sdpa"
    model = ViTMAEForPreTraining(cfg)
    return model, (lambda x: model(pixel_values=x).loss), f"attn_implementation={cfg._attn_implementation}"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(args) -> dict:
    """Time one model in this process; returns the measurements."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, loss_fn, note = build(args.worker)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.5e-4, weight_decay=0.05)
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    plain = loss_fn

    def loss_fn(x):  # noqa: F811  (the model's loss under the chosen precision)
        with cast():
            return plain(x)

    flops = step_flops(lambda: loss_fn(x).backward())  # model FLOPs: a plain step, no recomputation
    opt.zero_grad(set_to_none=True)
    if args.worker == "ours_ckpt":
        model.set_grad_checkpointing(True)
    if args.worker == "ours_compile":
        model.compile()
    rss_before = rss_mib()

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> tuple[float, list[float]]:
        """One train step; returns the loss and the seconds of forward, backward, optimiser."""
        t0 = sync()
        loss = loss_fn(x)
        t1 = sync()
        loss.backward()
        t2 = sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = sync()
        return loss.item(), [t1 - t0, t2 - t1, t3 - t2]

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phases = []
    for _ in range(args.steps):
        loss, ph = step()
        phases.append(ph)
    times = [sum(ph) for ph in phases]
    out = {
        "model": args.worker,
        "note": note,
        "params_trainable_M": sum(p.numel() for p in params) / 1e6,
        "samples_per_s": args.batch_size * len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "step_s": [round(t, 4) for t in times],
        "min_fwd_bwd_opt_s": [min(col) for col in zip(*phases)],
        "loss": loss,
        "mfu": flops / min(times) / (peak_tflops(device, args.peak_tflops)[0] * 1e12),
    }
    if cuda:
        out["peak_mem_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_MiB"] = rss_mib()
        out["rss_growth_MiB"] = rss_mib() - rss_before  # training-time peak over the built model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=2, help="alternate ours/hf this many times")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: see launch/runtime/perf.py)")
    ap.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    peak, source = peak_tflops(torch.device(args.device), args.peak_tflops)
    print(f"device={args.device} threads={args.threads} batch={args.batch_size} {args.precision} "
          f"warmup={args.warmup} steps={args.steps} torch={torch.__version__}; MFU against {peak:.3g} TFLOP/s "
          f"({source})", flush=True)
    models = args.models
    results: dict[str, list[dict]] = {m: [] for m in models}
    for r in range(args.rounds):
        for name in models:
            cmd = [sys.executable, __file__, "--worker", name, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
                   "--threads", str(args.threads), "--device", args.device]
            if args.peak_tflops:
                cmd += ["--peak-tflops", str(args.peak_tflops)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} worker failed:\n{proc.stderr.strip()}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(res)
            mem = (f"peak GPU mem {res['peak_mem_MiB']:.0f} MiB" if "peak_mem_MiB" in res else
                   f"peak RSS {res['peak_rss_MiB']:.0f} MiB (+{res['rss_growth_MiB']:.0f} MiB in training)")
            print(f"round {r}: {name:12s} {res['samples_per_s']:7.2f} samples/s  MFU {100 * res['mfu']:5.1f}%  "
                  f"median step {res['median_step_s']:.3f} s  "
                  f"(min fwd/bwd/opt {'/'.join(f'{t:.3f}' for t in res['min_fwd_bwd_opt_s'])} s)  {mem}  "
                  f"[{res['params_trainable_M']:.1f}M trainable; {res['note']}]", flush=True)
    # On a shared machine a slow step says more about the neighbours than the model: the ratio
    # uses each model's fastest step over all rounds (mean-based throughput printed beside it).
    mean = {m: max(r["samples_per_s"] for r in results[m]) for m in models}
    best = {m: args.batch_size / min(r["min_step_s"] for r in results[m]) for m in models}
    for m in models:
        line = f"fastest step over {args.rounds} round(s): {m:12s} {best[m]:8.2f} samples/s"
        if "hf" in best and m != "hf":
            line += (f", ratio {m}/hf = {best[m] / best['hf']:.3f} "
                     f"(best-round mean throughput ratio {mean[m] / mean['hf']:.3f})")
        print(line)


if __name__ == "__main__":
    main()
