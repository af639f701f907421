"""Peak memory and time of the contrastive losses (forward + backward) over a large batch.

``--loss infonce`` (the default): ``ClipLoss`` in one block against row chunks
(``ClipLoss(max_block=...)``, the trainer's ``loss_chunk_mib``), one process (N = B), V crops x B
images, C caption slots, width E.

``--loss siglip``: our ``SigLipLoss`` (one block of this rank's rows against one rank's captions,
then row chunks) beside open_clip's ``SigLipLoss`` (``dist_impl`` = our ``exchange``) at the same
global batch, on 1 rank and on W gloo ranks; one crop and one caption per image, which is what
open_clip's takes. On W ranks each rank holds N / W images; the figures are the worst rank's.

The features are leaves (as in cached accumulation, where the loss runs over the whole local batch
of k micro-batches). Each setting runs in a fresh subprocess, so its peak is its own (ru_maxrss on
a CPU, ``torch.cuda.max_memory_allocated`` on CUDA, one rank only), reported above the features'
own memory.

    python bench/loss_memory.py --batch 2048 --crops 6 --captions 2
    python bench/loss_memory.py --device cuda --batch 16384
    python bench/loss_memory.py --loss siglip --batch 4096 --worlds 1 2 --exchanges shift gather
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time



def _peak_bytes(dev) -> int:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args) -> dict:
    import torch
    import torch.nn.functional as F

    from clip.model.loss import ClipLoss

    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    V, B, C, E = args.crops, args.batch, args.captions, args.width
    img = F.normalize(torch.randn(V, B, E, device=dev, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(B, C, E, device=dev, generator=g), dim=-1).requires_grad_()
    mask = torch.ones(B, C, dtype=torch.bool, device=dev)
    scale = torch.tensor(14.3, device=dev, requires_grad=True)
    loss_fn = ClipLoss(max_block=args.chunk_mib * 2 ** 20 // 4)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else _peak_bytes(dev)
    times = []
    for _ in range(args.repeats + 1):
        sync()
        t = time.perf_counter()
        loss = loss_fn(img, txt, mask, scale)
        grads = torch.autograd.grad(loss, (img, txt, scale))
        sync()
        times.append(time.perf_counter() - t)
        del grads
    return {"chunk_mib": args.chunk_mib, "rows_per_chunk": loss_fn.rows_per_chunk(V, B, B, C),
            "peak_above_features_MiB": (_peak_bytes(dev) - base) / 2 ** 20, "ms": 1000 * min(times[1:]),
            "loss": float(loss)}


def _siglip_rank(rank: int, setting: dict, out_dir: str) -> None:
    """One rank of a SigLIP setting: its share of the global batch, timed, its peak written out."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(setting["threads"])
    world, dev = setting["world"], torch.device(setting["device"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    g = torch.Generator(device=dev).manual_seed(0)
    N, E = setting["batch"], setting["width"]
    B = N // world
    # every rank draws the same global batch, one rank's share at a time, and keeps its own
    img, txt = ([F.normalize(torch.randn(B, E, device=dev, generator=g), dim=-1) for _ in range(world)][rank]
                .requires_grad_() for _ in range(2))  # (B, E) each
    scale = torch.tensor(10.0, device=dev, requires_grad=True)
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)
    if setting["impl"] == "open_clip":
        from open_clip.loss import SigLipLoss as OpenClipSigLip

        oc = OpenClipSigLip(rank=rank, world_size=world, dist_impl=setting["exchange"])
        call = lambda: oc(img, txt, scale, bias)  # noqa: E731
        rows = B
    else:
        from clip.model.siglip import SigLipLoss

        ours = SigLipLoss(rank, world, max_block=setting["chunk_mib"] * 2 ** 20 // 4, exchange=setting["exchange"])
        mask = torch.ones(B, 1, dtype=torch.bool, device=dev)
        call = lambda: ours(img[None], txt[:, None], mask, scale, bias)  # noqa: E731  (1, B, E), (B, 1, E)
        rows = ours.rows_per_chunk(1, B, 1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if world > 1:
        dist.barrier()
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else _peak_bytes(dev)
    times = []
    for _ in range(setting["repeats"] + 1):
        if world > 1:
            dist.barrier()
        sync()
        t = time.perf_counter()
        loss = call()
        grads = torch.autograd.grad(loss, (img, txt, scale, bias))
        sync()
        times.append(time.perf_counter() - t)
        value = float(loss)
        del loss, grads  # no graph carried into the next repeat
    result = {"peak_MiB": (_peak_bytes(dev) - base) / 2 ** 20, "ms": 1000 * min(times[1:]), "loss": value,
              "rows_per_chunk": rows}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure_siglip(setting: dict) -> dict:
    """The setting on its world of ranks: the worst rank's peak and time, the ranks' mean loss
    (the 1-process loss for both implementations)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        if setting["world"] == 1:
            _siglip_rank(0, setting, out_dir)
        else:
            mp.spawn(_siglip_rank, args=(setting, out_dir), nprocs=setting["world"], join=True)
        ranks = [json.load(open(f"{out_dir}/rank{r}.json")) for r in range(setting["world"])]
    return {**setting, "peak_MiB": max(r["peak_MiB"] for r in ranks), "ms": max(r["ms"] for r in ranks),
            "loss": sum(r["loss"] for r in ranks) / len(ranks), "rows_per_chunk": ranks[0]["rows_per_chunk"]}


def _child(flags: list[str]) -> dict | None:
    r = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"error: {' '.join(flags)} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main_siglip(args) -> int:
    if (args.crops or 1) != 1 or (args.captions or 1) != 1:
        print("error: --loss siglip compares with open_clip's SigLipLoss, which takes one crop and one caption",
              file=sys.stderr)
        return 2
    if args.device != "cpu" and any(w > 1 for w in args.worlds):
        print("error: several ranks are run as gloo processes on the CPU only", file=sys.stderr)
        return 2
    N, E = args.batch, args.width
    print(f"siglip: device={args.device} global batch={N} width={E} threads/rank={args.threads}: open_clip keeps "
          f"{N * N * 4 / 2 ** 20:,.0f} MiB of logits per copy over the ranks")
    settings = []
    for world in args.worlds:
        for exchange in (args.exchanges if world > 1 else args.exchanges[:1]):
            settings.append({"impl": "open_clip", "world": world, "exchange": exchange, "chunk_mib": 0})
            settings += [{"impl": "ours", "world": world, "exchange": exchange, "chunk_mib": mib}
                         for mib in args.chunks_mib]
    rows = []
    for s in settings:
        s.update(batch=N, width=E, device=args.device, repeats=args.repeats, threads=args.threads)
        r = _child(["--siglip-setting", json.dumps(s)])
        if r is None:
            return 1
        rows.append(r)
    print(f"{'ranks':>5} {'exchange':>8} {'loss':>9} {'chunk_mib':>9} {'rows/chunk':>10} {'peak MiB':>9} "
          f"{'ms':>8} {'loss value':>11}")
    for r in rows:
        print(f"{r['world']:>5} {r['exchange'] if r['world'] > 1 else '-':>8} {r['impl']:>9} "
              f"{r['chunk_mib'] if r['impl'] == 'ours' else '-':>9} {r['rows_per_chunk']:>10} "
              f"{r['peak_MiB']:>9.0f} {r['ms']:>8.0f} {r['loss']:>11.6f}")
    for ref in (r for r in rows if r["impl"] == "open_clip"):
        for r in rows:
            if r["impl"] == "ours" and (r["world"], r["exchange"]) == (ref["world"], ref["exchange"]):
                print(f"ratio ours (chunk {r['chunk_mib']} MiB) / open_clip, {r['world']} rank(s)"
                      f"{', ' + r['exchange'] if r['world'] > 1 else ''}: "
                      f"{r['peak_MiB'] / max(ref['peak_MiB'], 1e-9):.2f}x memory, {r['ms'] / ref['ms']:.2f}x time")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=["infonce", "siglip"], default="infonce")
    p.add_argument("--batch", type=int, default=2048, help="images (siglip: the global batch)")
    p.add_argument("--crops", type=int, help="infonce: default 6; siglip: 1 only")
    p.add_argument("--captions", type=int, help="infonce: default 2; siglip: 1 only")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--chunks-mib", type=int, nargs="+", default=[0, 64, 16], help="0 = one block")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="siglip: numbers of gloo ranks")
    p.add_argument("--exchanges", nargs="+", default=["shift", "gather"], choices=["shift", "bidir", "gather"],
                   help="siglip: on several ranks, each ours beside open_clip's dist_impl of that name")
    p.add_argument("--threads", type=int, default=1, help="siglip: torch threads per rank")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-mib", type=int, help=argparse.SUPPRESS)  # child mode (infonce)
    p.add_argument("--siglip-setting", help=argparse.SUPPRESS)  # child mode (siglip)
    args = p.parse_args(argv)
    if args.siglip_setting is not None:
        print(json.dumps(measure_siglip(json.loads(args.siglip_setting))))
        return 0
    if args.loss == "siglip":
        return main_siglip(args)
    args.crops, args.captions = args.crops or 6, args.captions or 2
    if args.chunk_mib is not None:
        print(json.dumps(measure(args)))
        return 0
    V, B, C = args.crops, args.batch, args.captions
    print(f"device={args.device} crops={V} batch={B} captions={C} width={args.width}: one block of logits is "
          f"{V * B * B * C * 4 / 2 ** 20:,.0f} MiB per direction")
    rows = []
    for mib in args.chunks_mib:
        r = _child(["--batch", str(B), "--crops", str(V), "--captions", str(C), "--width", str(args.width),
                    "--repeats", str(args.repeats), "--device", args.device, "--chunk-mib", str(mib)])
        if r is None:
            return 1
        rows.append(r)
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
