"""Peak memory and time of the contrastive loss (forward + backward) over a large batch, in one
block against row chunks (``ClipLoss(max_block=...)``, the trainer's ``loss_chunk_mib``).

The features are leaves (as in cached accumulation, where the loss runs over the whole local batch
of k micro-batches): V crops x B images, C caption slots, width E, one process (N = B). Each
setting runs in a fresh subprocess, so its peak is its own (ru_maxrss on a CPU,
``torch.cuda.max_memory_allocated`` on CUDA), reported above the features' own memory.

    python bench/loss_memory.py --batch 2048 --crops 6 --captions 2
    python bench/loss_memory.py --device cuda --batch 16384
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))


def measure(args) -> dict:
    import torch
    import torch.nn.functional as F

    from clip.loss import ClipLoss

    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    V, B, C, E = args.crops, args.batch, args.captions, args.width
    img = F.normalize(torch.randn(V, B, E, device=dev, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(B, C, E, device=dev, generator=g), dim=-1).requires_grad_()
    mask = torch.ones(B, C, dtype=torch.bool, device=dev)
    scale = torch.tensor(14.3, device=dev, requires_grad=True)
    loss_fn = ClipLoss(max_block=args.chunk_mib * 2 ** 20 // 4)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats + 1):
        sync()
        t = time.perf_counter()
        loss = loss_fn(img, txt, mask, scale)
        grads = torch.autograd.grad(loss, (img, txt, scale))
        sync()
        times.append(time.perf_counter() - t)
        del grads
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"chunk_mib": args.chunk_mib, "rows_per_chunk": loss_fn.rows_per_chunk(V, B, B, C),
            "peak_above_features_MiB": (peak - base) / 2 ** 20, "ms": 1000 * min(times[1:]), "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--crops", type=int, default=6)
    p.add_argument("--captions", type=int, default=2)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--chunks-mib", type=int, nargs="+", default=[0, 64, 16], help="0 = one block")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-mib", type=int, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    if args.chunk_mib is not None:
        print(json.dumps(measure(args)))
        return 0
    V, B, C = args.crops, args.batch, args.captions
    print(f"device={args.device} crops={V} batch={B} captions={C} width={args.width}: one block of logits is "
          f"{V * B * B * C * 4 / 2 ** 20:,.0f} MiB per direction")
    rows = []
    for mib in args.chunks_mib:
        cmd = [sys.executable, __file__, "--batch", str(B), "--crops", str(V), "--captions", str(C), "--width",
               str(args.width), "--repeats", str(args.repeats), "--device", args.device, "--chunk-mib", str(mib)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"error: chunk_mib={mib} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'loss_chunk_mib':>14} {'rows/chunk':>10} {'peak MiB':>9} {'ms':>8} {'loss':>10}")
    for r in rows:
        print(f"{r['chunk_mib']:>14} {r['rows_per_chunk']:>10} {r['peak_above_features_MiB']:>9.0f} {r['ms']:>8.0f} {r['loss']:>10.6f}")
    one = rows[0]
    for r in rows[1:]:
        print(f"ratio chunk {r['chunk_mib']} MiB / one block: {r['peak_above_features_MiB'] / one['peak_above_features_MiB']:.2f}x memory, "
              f"{r['ms'] / one['ms']:.2f}x time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
