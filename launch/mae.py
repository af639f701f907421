"""Stage 1: MAE pretraining of the ViT encoder under DeepSpeed  ->  ``<out_dir>/mae_ckpt.pt``.

    deepspeed launch/mae.py [--config configs/mae.yaml] [--resume] [key=value ...]
    deepspeed --num_gpus 2 launch/mae.py --config configs/mae_tiny.yaml train.steps=50
    python launch/mae.py ...            # one process, no launcher

With no arguments it trains ViT-B/32 (KELIP's image tower) on the bundled emoji images for a
short demo run. Real runs point ``data.source`` at their own WebDataset shards or image folder.
Recipe as He et al. 2022: AdamW (0.9, 0.95), wd 0.05, lr = 1.5e-4 x batch / 256, warmup + cosine.
"""
if __name__ == "__main__":
    # `deepspeed launch/mae.py` runs this file as a script, which puts launch/ first on sys.path,
    # where this very file would shadow the `mae` package. Put the project root there instead.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from launch.config import PROJECT_ROOT, ConfigError, RunConfig, TrainConfig, load_config, resolve_path
from launch import runtime as rt
from mae.data import build_image_dataset, iter_manifest, load_rgb, mae_transform, resolve_source
from mae.model import MAEConfig, MaskedAutoencoder, save_encoder_checkpoint

# Stage 2's normalisation (OpenAI CLIP's statistics, clip.augment's defaults), so the encoder sees
# the same pixel distribution in both stages. MAE's own code used ImageNet's; the difference is small.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class MAEDataConfig:
    """Images for stage 1: an image folder, a JSONL manifest, or WebDataset shards."""

    source: str = "data/emoji/captions.jsonl"
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    mean: tuple[float, float, float] = PIXEL_MEAN
    std: tuple[float, float, float] = PIXEL_STD


@dataclass(frozen=True)
class MAERunConfig:
    """The whole stage-1 run: model, data, optimisation, outputs."""

    model: MAEConfig = field(default_factory=MAEConfig)
    data: MAEDataConfig = field(default_factory=MAEDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        base_lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=10))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/mae"))
    vis_every: int = 50  # reconstruction grid + loss curve every N steps (and at the end)
    vis_images: int = 8


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "mae.yaml"), help="run YAML (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


def fixed_images(source: str, n: int, img_size: int, mean, std) -> Optional[torch.Tensor]:
    """The first ``n`` decodable images of the source, center-cropped: the same every time."""
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(img_size),
                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ds = build_image_dataset(source, tf, shuffle=False)
    out = []
    for img, _ in ds:
        out.append(img)
        if len(out) == n:
            break
    return torch.stack(out) if out else None


def save_recon_grid(model: MaskedAutoencoder, imgs: torch.Tensor, mean, std, path: Path) -> None:
    """PNG: one row per image - original | masked | reconstruction (visible patches pasted)."""
    from torchvision.utils import save_image

    was_training = model.training
    model.eval()
    masked, recon = model.reconstruct(imgs)
    model.train(was_training)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    rows = torch.stack([imgs.float().cpu(), masked.float().cpu(), recon.float().cpu()], dim=1)  # (B, 3, C, H, W)
    rows = rows.flatten(0, 1) * s + m  # (B*3, C, H, W), un-normalised
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(rows.clamp(0, 1), tmp, nrow=3, padding=2, pad_value=1.0)
    tmp.replace(path)


def main(argv: list[str]) -> Path:
    args = parse_args(argv)
    cfg = load_config(MAERunConfig, args.config, args.overrides)
    source = resolve_path(cfg.data.source)
    resolve_source(source)  # a missing or empty source is one clear error before any process work
    dist = rt.init_distributed()
    rt.check_precision(cfg.train, dist.device)

    rt.set_seed(cfg.train.seed)  # same initial weights on every rank
    model = MaskedAutoencoder(cfg.model)
    rt.set_seed(cfg.train.seed + dist.rank)  # different augmentation streams per rank
    engine, ds_cfg = rt.build_engine(model, rt.param_groups(model, cfg.train.weight_decay), cfg.train, dist)
    out = rt.prepare_run_dir(cfg.run, cfg, dist, {"ds_config.json": ds_cfg})
    monitor = rt.Monitor(out, dist, resume=args.resume)

    enc = cfg.model.encoder
    dataset = build_image_dataset(
        source, mae_transform(enc.img_size, cfg.data.mean, cfg.data.std, scale=cfg.data.scale),
        rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed,
    )

    def loader(epoch: int):
        dataset.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train.micro_batch_size, num_workers=cfg.train.num_workers,
            drop_last=True, persistent_workers=False,
        )

    start = rt.resume_checkpoint(engine, out) if args.resume else 0

    def step_fn(batch, step):
        imgs, n_skipped = batch
        loss, _, _ = engine(imgs)
        return loss, {"count/skipped_images": float(n_skipped.sum())}

    vis = fixed_images(source, cfg.vis_images, enc.img_size, cfg.data.mean, cfg.data.std) if dist.is_main else None

    def visualise(step: int):
        if dist.is_main:
            if vis is not None:
                imgs = vis.to(dist.device, dtype=rt.model_dtype(cfg.train))
                save_recon_grid(engine.module, imgs, cfg.data.mean, cfg.data.std, out / "recon" / f"step_{step:07d}.png")
            monitor.plot("loss.png", ["train/loss"], "MAE training loss (norm-pix MSE on masked patches)")
        return None

    batches = rt.infinite_batches(loader, start_epoch=rt.epochs_done(start, dataset.num_samples(), cfg.train, dist))
    rt.train_loop(engine, batches, step_fn, cfg.train, cfg.run, dist, monitor,
                  start_step=start, every=[(cfg.vis_every, visualise)])
    rt.save_checkpoint(engine, out, cfg.train.steps, cfg.run.keep_last, dist)
    if dist.is_main:
        save_encoder_checkpoint(engine.module, out / "mae_ckpt.pt")
        hist = [r["train/loss"] for r in monitor.history() if "train/loss" in r]
        monitor.close()
        print(f"MAE done: {cfg.train.steps} steps, loss {hist[0]:.4f} -> {hist[-1]:.4f}" if hist else "MAE done")
        print(f"outputs: {out}/  (mae_ckpt.pt, loss.png, recon/, metrics.jsonl, tb/, checkpoints/)")
    rt.barrier(dist)
    return out


if __name__ == "__main__":
    rt.run_main(main)
