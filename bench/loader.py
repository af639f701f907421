"""Images/s of the CLIP data path, per core: shard -> decode -> multi-crop -> tokenize -> batch.

The photos in ``--photos`` (e.g. ``../shared/data/photos``) are re-encoded as JPEG (quality 90)
at shorter side ``--size``, repeated to ``--samples`` samples and written as WebDataset shards
(img2dataset layout, captions in English and Korean in ``{key}.json``) in a temporary folder.
Then, for each augmentation implementation (``clip.data.multicrop``: ``torchvision`` = the reference
path, ``fast``, ``device``), the training stream of ``configs/clip.yaml`` (its multi-crop, caption
languages and mode, context length and tokenizer) is read for ``--seconds``, in ``--rounds``
interleaved rounds (the median is reported, so a slow spell of a shared machine touches every
implementation alike):

* ``--workers 0`` (default): in this process, one thread: images/s per core.
* ``--workers N``: a DataLoader with N worker processes, as training runs it: images/s in total
  and per worker.

``fast`` leaves the flips and the normalisation to the accelerator and ``device`` all but the
decode and the box draws: that part (``views.finish``) is timed separately
(``finish``: ms per batch on ``--device``) and not counted in the CPU images/s. The last line
printed is the images/s per core of the default training path (``augment.impl`` of ``configs/clip.yaml``).

Two libraries made for this are measured when asked for (``--impls ... dali kornia``) and
installed: ``dali`` (NVIDIA DALI's CPU backend: its WebDataset reader, decoder and
``random_resized_crop``, one thread, the captions tokenized as ours) and ``kornia`` (the device
path's worker half, kornia's batched RandomResizedCrop + flip as the accelerator half).

    python bench/loader.py --photos ../shared/data/photos --size 256 --seconds 20
    python bench/loader.py --photos ../shared/data/photos --size 512 --workers 8 --device cuda

``--train-steps N`` instead trains the ``configs/clip.yaml`` model (ViT-B/32 + 12 x 512 text
tower, its multi-crop and captions; AdamW, ``--precision``) for N steps on the photo shards read
endlessly (``data.resampled``) by ``--workers`` DataLoader workers, per implementation, and reports
the share of step time spent waiting for data, the step time and MFU (``launch.runtime.perf``). It is the
training step without DeepSpeed (one device), so it runs where DeepSpeed is not installed.

Without the photo folder it exits 0 with a message (nothing to measure).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPLS = ("torchvision", "fast", "device")
OPTIONAL = ("dali", "kornia")  # measured when asked for (--impls ... dali kornia) and installed


def write_shards(photos: Path, size: int, samples: int, out: Path, shard_size: int = 128) -> int:
    from PIL import Image

    from mae.images.shards import write_shard_folder

    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"error: no photos in {photos}")
    enc = out / "encoded"
    enc.mkdir(parents=True)
    paths = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = size / min(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
            q = enc / (p.stem + ".jpg")
            im.save(q, "JPEG", quality=90)
            paths.append(q)
    records = [{"path": str(paths[i % len(paths)]), "name": paths[i % len(paths)].stem} for i in range(samples)]

    def members(r):
        caps = {"en": f"a photo of the {r['name'].replace('_', ' ')}", "ko": f"{r['name']} 사진"}
        return {"json": json.dumps({"captions": caps}, ensure_ascii=False).encode()}

    (out / "shards").mkdir()
    write_shard_folder(records, out / "shards", shard_size, members)
    return len(paths)


def tokenizer_for(cfg, scratch: Path):
    from tokenizer.bpe import BilingualTokenizer

    folder = Path(cfg.data.tokenizer)
    if not folder.is_absolute():
        folder = Path(ROOT) / folder
    try:
        return BilingualTokenizer.from_dir(folder), str(folder)
    except (FileNotFoundError, ValueError):
        from tokenizer.train import train_tokenizer

        out = scratch / "tokenizer"
        train_tokenizer([f"{ROOT}/data/corpus/en.txt", f"{ROOT}/data/corpus/ko.txt"], str(out), vocab_size=8000,
                        max_lines_per_file=8000, seed=0)
        return BilingualTokenizer.from_dir(out), f"{out} (8k vocab trained here: {folder} not found)"


def measure(cfg, impl: str, shards: str, tokenizer, batch: int, workers: int, seconds: float, device: str) -> dict:
    import torch

    from clip.data.multicrop import build_multicrop
    from clip.data.pairs import CaptionCollate, PairDataset

    aug = type(cfg.augment)(**{**cfg.augment.__dict__, "impl": "device" if impl == "kornia" else impl})
    views = build_multicrop(aug)
    ds = PairDataset(shards, views, languages=cfg.data.languages)
    collate = CaptionCollate(tokenizer, views, cfg.data.languages, mode=cfg.data.caption_mode,
                             context_length=cfg.model.text.context_length)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=collate, num_workers=workers,
                                         persistent_workers=workers > 0)
    n, first = 0, None
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in loader:
            if first is None:  # workers started and warm: time from the first batch on
                first, t0, n = b, time.perf_counter(), 0
                continue
            n += b["size"]
            if time.perf_counter() - t0 >= seconds:
                break
    rate = n / (time.perf_counter() - t0)
    finish_ms = None
    if impl != "torchvision" or device != "cpu":
        dev = torch.device(device)
        from launch.runtime.loop import to_device

        imgs = to_device(first["images"], dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        finish = kornia_finish(aug, dev) if impl == "kornia" else views.finish
        finish(imgs)
        sync()
        t = time.perf_counter()
        for _ in range(5):
            finish(imgs)
        sync()
        finish_ms = (time.perf_counter() - t) / 5 * 1e3
    return {"impl": impl, "images_per_s": rate, "per_core": rate / max(1, workers), "finish_ms": finish_ms,
            "batch_bytes": _nbytes(first["images"])}


def kornia_finish(aug, dev):
    """The device path's accelerator half done by kornia instead (``pip install kornia``): its
    batched RandomResizedCrop (bicubic warp, no antialiasing) + flip per crop size, then the
    normalisation, on the padded pixel batch. A timing comparison only: kornia draws its boxes on
    the padded canvas, not on each image, so mixed sizes would not get the reference's crops."""
    import kornia.augmentation as K
    import torch

    augs = [K.AugmentationSequential(K.RandomResizedCrop((size, size), scale=scale, ratio=(3 / 4, 4 / 3),
                                                         resample="bicubic", p=1.0), K.RandomHorizontalFlip())
            for size, scale in aug.specs()]
    mean = torch.tensor(aug.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(aug.std, device=dev).view(1, 3, 1, 1)

    def finish(batch):
        x = batch["pixels"].float() / 255.0
        return [(a(x) - mean) / std for a in augs]
    return finish


def measure_dali(cfg, shards: str, tokenizer, batch: int, seconds: float) -> dict:
    """The same views with NVIDIA DALI on its CPU backend (``nvidia-dali-cuda120`` installed): its
    WebDataset reader, one decode (libjpeg-turbo), then per crop ``random_resized_crop`` (cubic,
    antialias) and a random flip, uint8 HWC; captions tokenized as ``clip.data.pairs.CaptionCollate``
    does. One DALI thread, synchronous execution: a per-core figure like the others."""
    import glob

    import numpy as np
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from clip.data.pairs import CaptionCollate, extract_captions
    from mae.images.views import as_specs

    files = sorted(glob.glob(os.path.join(shards, "*.tar")))
    specs = as_specs(cfg.augment.specs())

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, exec_async=False, exec_pipelined=False,
                  prefetch_queue_depth=1, seed=0)
    def views():
        jpg, meta = fn.readers.webdataset(paths=files, ext=["jpg", "json"], name="reader")
        img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        crops = [fn.flip(fn.random_resized_crop(img, size=[size, size], random_area=list(scale),
                                                random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_CUBIC,
                                                antialias=True), horizontal=fn.random.coin_flip())
                 for size, scale in specs]
        return (*crops, meta)

    pipe = views()
    pipe.build()
    collate = CaptionCollate(tokenizer, cfg.data.languages, mode=cfg.data.caption_mode,
                             context_length=cfg.model.text.context_length)

    def one_batch() -> int:
        *crops, meta = pipe.run()
        images = [torch.from_numpy(np.array(c.as_tensor())).permute(0, 3, 1, 2) for c in crops]  # uint8 (B,3,S,S)
        samples = [{"key": str(i), "image": None, "captions": extract_captions(json.loads(bytes(np.array(m))),
                                                                               cfg.data.languages)[0]}
                   for i, m in enumerate(meta)]
        collate([{**s, "image": [x[i] for x in images]} for i, s in enumerate(samples)])
        return len(samples)

    one_batch()  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += one_batch()
    rate = n / (time.perf_counter() - t0)
    return {"impl": "dali", "images_per_s": rate, "per_core": rate, "finish_ms": None,
            "batch_bytes": batch * sum(3 * size * size for size, _ in specs)}


def train(cfg, impl: str, shards: str, tokenizer, batch: int, workers: int, steps: int, device: str,
          precision: str, warmup: int = 10) -> dict:
    """``steps`` training steps of the configured CLIP fed by the real stream; data wait and MFU."""
    import contextlib
    from dataclasses import replace

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clip.data.multicrop import build_multicrop
    from clip.data.pairs import CaptionCollate, PairDataset
    from clip.model import CLIP
    from clip.model.loss import ClipLoss
    from clip.model.tokens import text_config_for
    from launch.runtime.loop import to_device
    from launch.runtime.perf import peak_tflops

    dev = torch.device(device)
    aug = replace(cfg.augment, impl=impl)
    model = CLIP(replace(cfg.model, text=text_config_for(cfg.model.text, tokenizer))).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    loss_fn = ClipLoss()
    views = build_multicrop(aug)
    ds = PairDataset(shards, views, languages=cfg.data.languages, resampled=True)
    collate = CaptionCollate(tokenizer, views, cfg.data.languages, mode=cfg.data.caption_mode,
                             context_length=cfg.model.text.context_length)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=batch, collate_fn=collate, num_workers=workers,
                                              pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None))
    cast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    wait = total = 0.0
    flops = None
    for step in range(steps):
        t0 = time.perf_counter()
        b = to_device(next(loader), dev)
        t1 = time.perf_counter()
        with cast:
            counter = FlopCounterMode(display=False) if flops is None else contextlib.nullcontext()
            with counter:
                img, txt, scale = model(views.finish(b["images"]), b["tokens"], b["text_mask"])
                loss = loss_fn(img, txt, b["text_mask"], scale)
            if flops is None:
                flops = 3.0 * counter.get_total_flops() / batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the step's end (a sync, as the trainer's loss check)
        t2 = time.perf_counter()
        if step >= warmup:
            wait, total = wait + (t1 - t0), total + (t2 - t0)
    n = max(1, steps - warmup)
    peak, src = peak_tflops(dev)
    sps = n * batch / total
    return {"impl": impl, "data_wait_share": wait / total, "step_s": total / n, "samples_per_s": sps,
            "mfu": flops * sps / (peak * 1e12), "peak": src,
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package
        return False


def _nbytes(images) -> int:
    if isinstance(images, dict):
        return sum(_nbytes(v) for v in images.values())
    if isinstance(images, (list, tuple)):
        return sum(_nbytes(v) for v in images)
    return images.numel() * images.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", default=os.path.join(ROOT, "..", "shared", "data", "photos"))
    ap.add_argument("--size", type=int, default=256, help="shorter side of the re-encoded JPEGs")
    ap.add_argument("--seconds", type=float, default=10.0, help="per implementation (over all rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="0: in-process, one thread (per-core figure)")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + OPTIONAL)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "clip.yaml"))
    ap.add_argument("--device", default="cpu", help="where views.finish runs (cuda for the GPU path)")
    ap.add_argument("--train-steps", type=int, default=0, help="train the configured CLIP this many steps per impl")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="with --train-steps")
    args = ap.parse_args()
    if not os.path.isdir(args.photos):
        print(f"skipped: no photo folder at {args.photos} (pass --photos DIR)")
        return

    import torch

    from launch.runtime.config import load_config
    from launch.stages.clip import CLIPRunConfig

    torch.set_num_threads(1)
    cfg = load_config(CLIPRunConfig, args.config, [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_photos = write_shards(Path(args.photos), args.size, args.samples, tmp)
        tok, tok_src = tokenizer_for(cfg, tmp)
        a = cfg.augment
        print(f"# {n_photos} photos at shorter side {args.size} px, {args.samples} samples in shards; "
              f"{a.global_crops} x {a.global_size} + {a.local_crops} x {a.local_size} px crops, captions "
              f"{list(cfg.data.languages)} ({cfg.data.caption_mode}), tokenizer {tok_src}; batch {args.batch_size}, "
              f"workers {args.workers}, {args.seconds:g} s each in {args.rounds} interleaved rounds (median), "
              f"torch {torch.__version__}")
        if args.train_steps:
            print(f"{'impl':12s} {'data wait':>9s} {'step s':>7s} {'samples/s':>10s} {'MFU':>6s} {'peak GiB':>8s}"
                  f"  ({args.precision}, batch {args.batch_size}, {args.workers} workers, {args.train_steps} steps, "
                  f"first 10 not timed, {args.device})", flush=True)
            for impl in args.impls:
                r = train(cfg, impl, str(tmp / "shards"), tok, args.batch_size, args.workers, args.train_steps,
                          args.device, args.precision)
                print(f"{impl:12s} {100 * r['data_wait_share']:8.1f}% {r['step_s']:7.3f} {r['samples_per_s']:10.1f} "
                      f"{100 * r['mfu']:5.1f}% {r['peak_mem_gib']:8.1f}  (peak: {r['peak']})", flush=True)
            return
        # interleaved rounds (each impl args.seconds / rounds per round), the median per impl: a
        # slow spell of a shared machine then touches every impl, not one
        impls = list(args.impls)
        for impl, module, wheel in (("dali", "nvidia.dali", "nvidia-dali-cuda120"), ("kornia", "kornia", "kornia")):
            if impl in impls and not _installed(module):
                print(f"# {impl}: skipped (pip install {wheel} to measure it)")
                impls.remove(impl)
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                if impl == "dali":
                    runs[impl].append(measure_dali(cfg, str(tmp / "shards"), tok, args.batch_size,
                                                   args.seconds / args.rounds))
                    continue
                runs[impl].append(measure(cfg, impl, str(tmp / "shards"), tok, args.batch_size, args.workers,
                                          args.seconds / args.rounds, args.device))
        rows = {impl: sorted(r, key=lambda x: x["per_core"])[len(r) // 2] for impl, r in runs.items()}
    base = rows.get("torchvision")
    print(f"{'impl':12s} {'images/s':>9s} {'per core':>9s} {'vs torchvision':>15s} {'batch MiB':>10s} "
          f"{'finish ms/batch (' + args.device + ')':>26s}")
    for impl, r in rows.items():
        ratio = f"{r['per_core'] / base['per_core']:.2f}x" if base else "-"
        fin = f"{r['finish_ms']:.1f}" if r["finish_ms"] is not None else "-"
        print(f"{impl:12s} {r['images_per_s']:9.1f} {r['per_core']:9.1f} {ratio:>15s} "
              f"{r['batch_bytes'] / 2**20:10.1f} {fin:>26s}")
    if "device" in rows or "kornia" in rows:
        print("# device, kornia: CPU side only (decode + boxes); their crops run on the accelerator (finish)")
    default = cfg.augment.impl
    if default in rows:
        print(f"{rows[default]['per_core']:.1f}")


if __name__ == "__main__":
    main()
