"""Train-step throughput of our CLIP (ViT-B/32 + 12x512 text tower) against open_clip's ViT-B-32.

One step = forward of both towers + contrastive loss + backward + AdamW step, fp32, one process,
the same batch every step. Each variant runs in a fresh subprocess (clean peak-memory numbers):

* ``open_clip``: ``open_clip.create_model("ViT-B-32", pretrained=None)`` + ``open_clip.ClipLoss``
  (vocab 49408, text always run over the full 77-token context, pooled at argmax(ids)).
* ``ours``: ``clip.model.CLIP`` (vocab 98304, so a 2x larger token embedding to update) +
  ``clip.model.loss.ClipLoss``; the text tower runs on each caption's tokens up to its EOT only
  (packed, ``clip/model/text.py``), with the same result as over the padding: with
  ``--caption-len 76:76`` (no padding anywhere) both towers do the same text work.
* ``ours_pd0.5``: the same with FLIP patch dropout 0.5 in the image tower.
* ``ours_ckpt``: ``ours`` with activation checkpointing in both towers.
* ``ours_compile``: ``ours`` after ``model.compile()`` (inductor); ``ours_pd0.5_compile``: both.
* ``ours_cached``: ``ours`` as ``--accum`` micro-batches of batch / accum with feature-cached
  accumulation (``launch.runtime.gradcache``): the same contrastive batch at a micro-batch's memory;
  ``ours_cached_compile``: the same after ``model.compile()`` (``train.compile`` allows both).

``--precision bf16`` runs every variant under ``torch.autocast`` (fp32 weights). Each row gives
MFU (``launch/runtime/perf.py``: FLOPs of the step counted on the eager model / time / peak).

Inputs are identical: the same image batch and, per row, the same caption length
(``--caption-len MIN:MAX`` tokens incl. SOT, uniform; EOT then padding to 77). Token ids are
random below each model's vocabulary, with each model's own SOT / EOT ids.

    python bench/clip_speed.py --device cuda --batch-size 256 --steps 30 --precision bf16
    python bench/clip_speed.py --batch-size 8 --variants open_clip ours ours_ckpt   # CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

from launch.runtime.perf import peak_tflops, step_flops

VARIANTS = ("open_clip", "ours", "ours_pd0.5", "ours_pd0.5_compile", "ours_ckpt", "ours_compile", "ours_cached",
            "ours_cached_compile")


def make_inputs(batch_size: int, caption_len: tuple[int, int], seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 224, 224, generator=g)
    lengths = torch.randint(caption_len[0], caption_len[1] + 1, (batch_size,), generator=g)
    return images, lengths, g


def tokens_for(lengths, low: int, high: int, sot: int, eot: int, pad: int, g):
    """(B, 77) rows [SOT] random ids in [low, high) [EOT] [PAD]..."""
    import torch
    tok = torch.full((len(lengths), 77), pad, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tok[i, 0], tok[i, n] = sot, eot
        tok[i, 1:n] = torch.randint(low, high, (n - 1,), generator=g)
    return tok


def run_variant(name: str, args) -> dict:
    import torch
    torch.manual_seed(0)
    device = torch.device(args.device)
    images, lengths, g = make_inputs(args.batch_size, args.caption_len)
    if name == "open_clip":
        import open_clip
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        loss_fn = open_clip.ClipLoss()
        tokens = tokens_for(lengths, 1, 49406, 49406, 49407, 0, g)

        def step_loss(images, tokens):
            img, txt, scale = model(images, tokens)
            return loss_fn(img, txt, scale)
        params = model.parameters()
    else:
        from clip.model.loss import ClipLoss
        from clip.model import CLIP, CLIPConfig
        from launch.runtime.optim import param_groups
        pd = 0.5 if name.startswith("ours_pd0.5") else 0.0
        model = CLIP(CLIPConfig(patch_dropout=pd))
        loss_fn = ClipLoss()
        t = model.cfg.text
        tokens = tokens_for(lengths, 3, t.vocab_size, 1, t.eot_id, t.pad_id, g)

        def step_loss(images, tokens):
            img, txt, scale = model([images], tokens)  # (1, B, E), (B, 1, E)
            return loss_fn(img, txt, torch.ones(txt.shape[:2], dtype=torch.bool,
                                                device=txt.device), scale)
        params = param_groups(model, 0.2)[0]
    model.to(device).train()
    images, tokens = images.to(device), tokens.to(device)
    try:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.2, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.2)
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext

    def plain_fwd_bwd(imgs, toks):
        with cast():
            loss = step_loss(imgs, toks)
        loss.backward()
        return loss

    # Model FLOPs (MFU's numerator): one plain forward + backward of the whole batch, without the
    # recomputation that checkpointing or cached accumulation add; for ours_cached counted on one
    # micro-batch (times accum), so that the count does not hold a whole batch's activations.
    cached = name.startswith("ours_cached")
    k = args.accum if cached else 1
    flops = k * step_flops(lambda: plain_fwd_bwd(images[: len(images) // k], tokens[: len(tokens) // k]))
    opt.zero_grad(set_to_none=True)
    if name == "ours_ckpt":
        model.set_grad_checkpointing(True)
    if cached:
        from launch.runtime.gradcache import CachedContrastiveStep

        class Eager:  # the engine's interface on the plain model (its forward under the precision's autocast)
            module = model
            backward = staticmethod(lambda loss, scale_wrt_gas=True: loss.backward())
            step = staticmethod(lambda: None)

            def __call__(self, *args):
                with cast():
                    return model(*args)

        cached_step = CachedContrastiveStep(Eager(), loss_fn)
        micro = [{"images": [x], "tokens": tk[:, None], "text_mask": torch.ones(len(tk), 1, dtype=torch.bool,
                                                                                device=device)}
                 for x, tk in zip(images.chunk(k), tokens.chunk(k))]

        def fwd_bwd():
            return cached_step(micro)[0]
    else:
        def fwd_bwd():
            return plain_fwd_bwd(images, tokens)
    if name.endswith("_compile"):
        model.compile()
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        loss = fwd_bwd()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
    peak, _ = peak_tflops(device, args.peak_tflops)
    out = {"variant": name, "samples_per_s": args.steps * args.batch_size / dt,
           "step_ms": 1000 * dt / args.steps, "params_M": n_params / 1e6,
           "mfu": flops / (dt / args.steps) / (peak * 1e12), "step_gflop": flops / 1e9,
           "loss": float(loss),
           "max_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU, 1 CPU)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--caption-len", default="8:40",
                   help="MIN:MAX tokens before EOT (incl. SOT), uniform per row; 76:76 = full")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant; medians reported")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--accum", type=int, default=4, help="micro-batches of ours_cached (batch / accum each)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: see launch/runtime/perf.py)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    try:
        lo, hi = (int(x) for x in args.caption_len.split(":"))
        if not 1 <= lo <= hi <= 76:
            raise ValueError
    except ValueError:
        print(f"error: --caption-len must be MIN:MAX with 1 <= MIN <= MAX <= 76, got "
              f"{args.caption_len!r}", file=sys.stderr)
        return 2
    args.caption_len = (lo, hi)
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (30 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0

    child = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--steps",
             str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
             "--caption-len", f"{lo}:{hi}", "--precision", args.precision, "--accum", str(args.accum)]
    if args.peak_tflops:
        child += ["--peak-tflops", str(args.peak_tflops)]
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every variant
        for v in args.variants:
            proc = subprocess.run(child + ["--variant", v], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"error: variant {v} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            runs[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # the median run of each variant (by throughput)
    results = {v: sorted(rs, key=lambda r: r["samples_per_s"])[len(rs) // 2]
               for v, rs in runs.items()}

    gpu_name = next(iter(results.values())).get("gpu", "")
    import torch
    peak, source = peak_tflops(torch.device(args.device), args.peak_tflops)
    print(f"device={args.device} {gpu_name} batch={args.batch_size} steps={args.steps} "
          f"warmup={args.warmup} repeats={args.repeats} caption_len={lo}:{hi} "
          f"(+EOT, padded to 77) {args.precision}; ours_cached = {args.accum} x {args.batch_size // args.accum}; "
          f"MFU against {peak:.3g} TFLOP/s ({source})")
    print("vocab: open_clip 49408, ours 98304 (ours updates a 2x larger token embedding)")
    mem = "cuda_peak_MiB" if gpu else "max_rss_MiB"
    print(f"{'variant':<19} {'params(M)':>9} {'GFLOP':>8} {'step(ms)':>9} {'samples/s':>10} {'MFU':>7} {mem:>14}  all runs")
    for v, r in results.items():
        every = " ".join(f"{x['samples_per_s']:.1f}" for x in runs[v])
        print(f"{v:<19} {r['params_M']:>9.1f} {r['step_gflop']:>8.0f} {r['step_ms']:>9.1f} {r['samples_per_s']:>10.1f} "
              f"{100 * r['mfu']:>6.1f}% {r[mem]:>14.0f}  [{every}]")
    if "open_clip" in results:
        base = results["open_clip"]
        for v in results:
            if v != "open_clip":
                print(f"ratio {v}/open_clip = {results[v]['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, "
                      f"{results[v][mem] / base[mem]:.2f}x memory (medians)")
    if "ours" in results:  # accumulation against the one big step of the same contrastive batch
        for v in (v for v in results if v.startswith("ours_cached")):
            print(f"ratio {v}/ours = {results[v]['samples_per_s'] / results['ours']['samples_per_s']:.2f}x samples/s, "
                  f"{results[v][mem] / results['ours'][mem]:.2f}x memory (medians)")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
