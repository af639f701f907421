"""Stage 1: MAE pretraining of the ViT encoder under DeepSpeed  ->  ``<out_dir>/mae_ckpt.pt``.

Run through the script ``launch/mae.py`` (``deepspeed launch/mae.py [--config F] [key=value ...]``).
With no arguments it trains ViT-B/32 (KELIP's image tower) on the bundled emoji images for a
short demo run. Real runs point ``data.source`` at their own WebDataset shards or image folder.
Recipe as He et al. 2022: AdamW (0.9, 0.95), wd 0.05, lr = 1.5e-4 x batch / 256, warmup + cosine.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from launch.cli import parse_run_args, start_run
from launch.config import PROJECT_ROOT, GuardConfig, RunConfig, StreamConfig, TrainConfig, resolve_path
from launch.dist import barrier, set_seed
from launch.guard import Guard
from launch.loop import Trainer, check_source, fingerprint, prepare_run_dir, summary_line
from launch.monitor import Monitor
from launch.optim import build_engine, maybe_compile
from launch.stream import BatchStream
from mae.checkpoint import atomic_write_bytes
from mae.data import CLIP_MEAN, CLIP_STD, eval_transform, mae_transform
from mae.dataset import build_image_dataset, collate_images
from mae.model import MAEConfig, MaskedAutoencoder, save_encoder_checkpoint
from mae.views import DeviceCrops, FastCrops, finish_views


@dataclass(frozen=True)
class MAEDataConfig(StreamConfig):
    """Images for stage 1: an image folder, a JSONL / CSV manifest, or WebDataset shards (local,
    ``pipe:``, http; ``::`` mixes); how they are read: :class:`launch.config.StreamConfig`."""

    source: str = "data/emoji/captions.jsonl"
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # How the view is made (as CLIP's augment.impl, mae.views): "fast" (box first, reduced JPEG
    # decode, uint8 to the device), "torchvision" (the reference transform) or "device" (crops on the GPU).
    impl: Literal["fast", "torchvision", "device"] = "fast"

    def view(self, size: int):
        """The worker-side transform of ``impl``."""
        if self.impl == "torchvision":
            return mae_transform(size, self.mean, self.std, scale=self.scale)
        return (FastCrops if self.impl == "fast" else DeviceCrops)([(size, self.scale)])


@dataclass(frozen=True)
class MAERunConfig:
    """The whole stage-1 run: model, data, optimisation, outputs."""

    model: MAEConfig = field(default_factory=MAEConfig)
    data: MAEDataConfig = field(default_factory=MAEDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        base_lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=10))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/mae"))
    guard: GuardConfig = field(default_factory=GuardConfig)
    vis_every: int = 50  # reconstruction grid + loss curve every N steps (and at the end)
    vis_images: int = 8


def fixed_images(source: str, n: int, img_size: int, mean, std) -> Optional[torch.Tensor]:
    """The first ``n`` decodable images of the source, center-cropped: the same every time."""
    out = []
    for item in build_image_dataset(source, eval_transform(img_size, mean, std), shuffle=False):
        out.append(item["image"])
        if len(out) == n:
            break
    return torch.stack(out) if out else None


def save_recon_grid(model: MaskedAutoencoder, imgs: torch.Tensor, mean, std, step: int, path: Path) -> None:
    """PNG: one row per image, columns original | masked input | reconstruction (visible patches pasted)."""
    from matplotlib.figure import Figure

    was_training = model.training
    model.eval()
    masked, recon = model.reconstruct(imgs)
    model.train(was_training)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    cols = [t.float().cpu() * s + m for t in (imgs, masked, recon)]  # 3 x (B, C, H, W), un-normalised
    B = imgs.shape[0]
    fig = Figure(figsize=(3 * 1.6, B * 1.6 + 0.5))
    axes = fig.subplots(B, 3, squeeze=False)
    for c, title in enumerate(("original", f"masked ({model.cfg.mask_ratio:.0%})", "reconstruction")):
        axes[0, c].set_title(title, fontsize=9)
        for b in range(B):
            axes[b, c].imshow(cols[c][b].clamp(0, 1).permute(1, 2, 0).numpy())
            axes[b, c].axis("off")
    fig.suptitle(f"MAE reconstructions at step {step}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str]) -> Path:
    args, cfg = parse_run_args(argv, MAERunConfig, __doc__.split("\n")[0],
                               str(PROJECT_ROOT / "configs" / "mae.yaml"))
    source = resolve_path(cfg.data.source)
    check_source(source, "data.source", cfg.data)
    dist = start_run(cfg, args.print_config, args.resume)
    if dist is None:
        return Path(cfg.run.out_dir)

    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = MaskedAutoencoder(cfg.model)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    maybe_compile(model, cfg.train)
    set_seed(cfg.train.seed + dist.rank)  # different masking streams per rank
    engine, ds_cfg, schedule = build_engine(model, cfg.train, dist)
    out = prepare_run_dir(cfg.run, cfg, dist, {"ds_config.json": ds_cfg})
    monitor = Monitor(out, dist, resume=args.resume, wandb=cfg.run.wandb)
    monitor.start(cfg, model)

    enc = cfg.model.encoder
    dataset = build_image_dataset(
        source, cfg.data.view(enc.img_size),
        rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed, **cfg.data.stream_options(),
    )
    stream = BatchStream(dataset, lambda epoch: torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.micro_batch_size, num_workers=cfg.train.num_workers,
        collate_fn=collate_images, generator=torch.Generator()), cfg.train.micro_batch_size, cfg.train.num_workers)

    def step_fn(batch):  # uint8 views normalised / device views cropped, on the device
        images = finish_views(batch["images"], [(enc.img_size, cfg.data.scale)], cfg.data.mean, cfg.data.std)[0]
        loss, _, _ = engine(images)
        return loss, {"count/skipped_samples": batch["n_skipped"], "count/broken_shards": batch["n_broken_shards"]}

    trainer = Trainer(engine, stream, step_fn, cfg.train, cfg.run, dist, monitor, schedule,
                      guard=Guard(cfg.guard), identity={"model config": (fingerprint(cfg.model), "resume with its "
                                                                         f"config: --config {out / 'config.yaml'}")})
    if args.resume:
        trainer.resume()
    vis = fixed_images(source, cfg.vis_images, enc.img_size, cfg.data.mean, cfg.data.std) if dist.is_main else None

    def visualise(step: int):
        if dist.is_main:
            if vis is not None:
                grid = out / "recon" / f"step_{step:07d}.png"
                save_recon_grid(engine.module, vis.to(dist.device), cfg.data.mean, cfg.data.std, step, grid)
                monitor.image("mae/reconstructions", grid, step)
            monitor.plot("loss.png", ["train/loss"], "MAE training loss", "norm-pix MSE on masked patches",
                         chance=1.0 if cfg.model.norm_pix_loss else None,
                         chance_label="predicting each patch's mean", labels={"train/loss": "train"})

    trainer.fit(hooks=[(cfg.vis_every, visualise)])
    trainer.save()
    if dist.is_main:
        save_encoder_checkpoint(engine.module, out / "mae_ckpt.pt")
        hist = [r["train/loss"] for r in monitor.history() if "train/loss" in r]
        monitor.close()
        print(f"MAE done: {cfg.train.steps} steps, loss {hist[0]:.4f} -> {hist[-1]:.4f}" if hist else "MAE done")
        print(summary_line(trainer.skip_totals()))
        print(f"outputs: {out}/  (mae_ckpt.pt, loss.png, recon/, metrics.jsonl, tb/, checkpoints/)")
    barrier(dist)
    return out
