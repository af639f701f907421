"""Stage 1: MAE pretraining of the ViT encoder under DeepSpeed  ->  ``<out_dir>/mae_ckpt.pt``.

Run through the script ``launch/mae.py`` (``deepspeed launch/mae.py [--config F] [key=value ...]``).
With no arguments it trains ViT-B/32 (KELIP's image tower) on the bundled emoji images for a
short demo run. Real runs point ``data.source`` at their own WebDataset shards or image folder.
Recipe as He et al. 2022: AdamW (0.9, 0.95), wd 0.05, lr = 1.5e-4 x batch / 256, warmup + cosine.
Read top to bottom, :func:`main` is config -> process group -> model -> data -> engine -> loop.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from launch.runtime.cli import open_run, parse_run_args, start_run
from launch.runtime.config import (PROJECT_ROOT, GuardConfig, RunConfig, StreamConfig, TrainConfig, check_source,
                                   resolve_path)
from launch.runtime.dist import barrier, set_seed
from launch.runtime.engine import Engine
from launch.runtime.guard import Guard
from launch.runtime.loop import Step, Trainer
from launch.runtime.optim import LRSchedule, param_groups
from launch.runtime.stream import BatchStream
from mae.checkpoint import save_encoder_checkpoint
from mae.common.files import atomic_write_bytes
from mae.images.decode import Background, Decoded
from mae.images.stream import ImageCollate, ImageDataset
from mae.images.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, eval_transform
from mae.images.views import Views, ViewsImpl, make_views
from mae.model import MAEConfig, MaskedAutoencoder


@dataclass(frozen=True)
class MAEDataConfig(StreamConfig):
    """Images for stage 1: an image folder, a JSONL / CSV manifest, or WebDataset shards (local,
    ``pipe:``, http; ``::`` mixes); how they are read: :class:`launch.runtime.config.StreamConfig`.
    ``impl``: the crop engine (:mod:`mae.images.views`); ``mean`` / ``std``: the pixel
    normalisation, recorded in ``mae_ckpt.pt``; ``background``: what transparent pixels are
    composited onto."""

    source: str = "data/emoji/captions.jsonl"
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    impl: ViewsImpl = "fast"
    background: Background = "white"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be an area range 0 < min <= max <= 1, got {list(self.scale)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {list(self.std)}")

    def views(self, img_size: int) -> Views:
        """The stage's view maker: one random crop of ``img_size`` px."""
        return make_views(self.impl, [(img_size, self.scale)], self.mean, self.std, background=self.background)


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

    def __post_init__(self):
        if self.vis_every < 0 or self.vis_images < 0:
            raise ValueError(f"vis_every and vis_images must be >= 0, got {self.vis_every} and {self.vis_images}")


class MAEStep(Step):
    """One optimizer step of stage 1: the batch's views finished on the device, the MAE loss."""

    def __init__(self, engine: Engine, views: Views):
        super().__init__(engine)
        self.views = views

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = self.views.finish(batch["images"])[0]  # (B, 3, S, S) float, normalised
        loss, _, _ = self.engine(images)
        return loss, {"count/skipped_samples": batch["n_skipped"], "count/broken_shards": batch["n_broken_shards"]}


def main(argv: list[str]) -> Path:
    # config: every check before any process work
    args, cfg = parse_run_args(argv, MAERunConfig, __doc__.split("\n")[0], str(PROJECT_ROOT / "configs" / "mae.yaml"))
    source = resolve_path(cfg.data.source)
    check_source(source, "data.source", cfg.data)
    out = Path(cfg.run.out_dir)
    start = start_run(cfg, args)
    if start is None:
        return out
    dist = start.dist

    # model: the same initial weights on every rank, then different masking streams per rank
    set_seed(cfg.train.seed)
    model = MaskedAutoencoder(cfg.model)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    set_seed(cfg.train.seed + dist.rank)

    # data
    enc = cfg.model.encoder
    views = cfg.data.views(enc.img_size)
    dataset = ImageDataset(source, views, rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed,
                           **cfg.data.stream_options())
    stream = BatchStream(dataset, lambda epoch: torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.micro_batch_size, num_workers=cfg.train.num_workers,
        collate_fn=ImageCollate(views), generator=torch.Generator()), cfg.train.micro_batch_size, cfg.train.num_workers)

    # engine
    groups, specs = param_groups(model, cfg.train.weight_decay)
    schedule = LRSchedule(cfg.train, dist.world_size, specs)
    engine, monitor = open_run(cfg, start, model, groups, schedule)

    # loop
    trainer = Trainer(cfg, dist, engine, stream, MAEStep(engine, views), monitor, schedule, guard=Guard(cfg.guard),
                      identity=start.identity)
    if start.resume:
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
        save_encoder_checkpoint(engine.module, out / "mae_ckpt.pt", cfg.data.mean, cfg.data.std)
        if trainer.ema is not None:  # beside the trained weights: --init takes either file
            with trainer.ema.swapped():
                save_encoder_checkpoint(engine.module, out / "mae_ckpt_ema.pt", cfg.data.mean, cfg.data.std)
        hist = [r["train/loss"] for r in monitor.history() if "train/loss" in r]
        monitor.finish(f"MAE done: {cfg.train.steps} steps, loss {hist[0]:.4f} -> {hist[-1]:.4f}" if hist else "MAE done",
                       trainer.skip_totals(), "mae_ckpt.pt, loss.png, recon/")
    barrier(dist)
    return out


def fixed_images(source: str, n: int, img_size: int, mean, std) -> Optional[torch.Tensor]:
    """The first ``n`` decodable images of the source, center-cropped: the same every time."""
    out = []
    for item in ImageDataset(source, Decoded(eval_transform(img_size, mean, std)), shuffle=False):
        out.append(item["image"])
        if len(out) == n:
            break
    return torch.stack(out) if out else None


def save_recon_grid(model: MaskedAutoencoder, imgs: torch.Tensor, mean, std, step: int, path: Path) -> None:
    """PNG: one row per (training) image, columns original | masked input | reconstruction (visible
    patches pasted)."""
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
    fig.suptitle(f"MAE reconstructions of training images, step {step}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
