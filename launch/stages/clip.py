"""Stage 2: bilingual CLIP from the MAE encoder under DeepSpeed  ->  ``<out_dir>/clip_ckpt.pt``.

Run through the script ``launch/clip.py`` (``deepspeed launch/clip.py --init mae_ckpt.pt ...``).
KELIP: MAE-initialised ViT-B/32, multi-crop (224 + 96 px), 98K bilingual BPE, pre-LN GPT-2 text
tower (12 x 512 x 8). Parallel Multilingual CLIP: each image carries captions in several languages,
the image is encoded once per crop and every translation is a positive (``data.caption_mode: all``),
and pretrained towers are frozen for the first half epoch (``freeze.image_epochs: 0.5``).
AdamW (0.9, 0.98, eps 1e-6), wd 0.2 (not on biases, norms, embeddings, temperature).
Read top to bottom, :func:`main` is config -> process group -> model -> data -> engine -> loop;
the configuration and what is decided before any process work are :mod:`launch.stages.clip_config`.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from clip.data.multicrop import build_multicrop
from clip.data.pairs import CaptionCollate, PairDataset
from clip.eval.tasks import evaluate_heldout
from clip.model.checkpoint import save_clip
from clip.model.clip import CLIP
from clip.model.distill import DistillLoss, DistillTerm
from clip.model.loss import ClipLoss
from clip.model.siglip import SigLipLoss
from launch.runtime.cli import open_run, parse_run_args, start_run
from launch.runtime.config import PROJECT_ROOT, ConfigError, dump_config
from launch.runtime.dist import barrier, set_seed
from launch.runtime.engine import Engine
from launch.runtime.gradcache import CachedContrastiveStep
from launch.runtime.guard import Guard
from launch.runtime.loop import Step, Trainer
from launch.runtime.monitor import Monitor
from launch.runtime.optim import FreezeSchedule, LRSchedule, freeze_steps, global_batch, layer_decay, param_groups
from launch.runtime.stream import BatchStream
from launch.stages.clip_config import KINDS, CLIPRunConfig, ClipRun, keep_tokenizer, resolve
from mae.images.decode import Decoded
from mae.images.transforms import eval_transform
from mae.images.views import Views


class ClipStep(Step):
    """One optimizer step of stage 2: the views finished on the device, both towers, the
    contrastive loss over the global batch (InfoNCE, or the sigmoid loss with the model's bias);
    with cached accumulation all micro-batches of the step in one loss
    (:class:`launch.runtime.gradcache.CachedContrastiveStep`); with ``distill`` (a
    :class:`clip.model.distill.DistillTerm`) its KL to a frozen teacher added. After each step the
    temperature parameter is clamped to [0, log max_logit_scale]."""

    def __init__(self, engine: Engine, views: Views, loss_fn, cached: bool, max_logit_scale: float,
                 distill: DistillTerm | None = None):
        super().__init__(engine)
        self.views, self.loss_fn, self.max_log_scale = views, loss_fn, math.log(max_logit_scale)
        self.distill = distill
        self.cached = CachedContrastiveStep(engine, loss_fn, distill) if cached else None

    def finish(self, batch: dict) -> dict:
        return {**batch, "images": self.views.finish(batch["images"])}

    def bias(self) -> tuple:
        """The sigmoid loss's logit bias, as its last argument (nothing for InfoNCE)."""
        bias = getattr(self.engine.module, "logit_bias", None)
        return () if bias is None else (bias,)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        batch = self.finish(batch)
        img, txt, scale = self.engine(batch["images"], batch["tokens"], batch["text_mask"])
        loss = self.loss_fn(img, txt, batch["text_mask"], scale, *self.bias())
        if self.distill is not None:
            targets = self.distill.targets(batch["images"], batch["captions"], batch["text_mask"],
                                           batch["slot_languages"])
            loss = loss + self.distill(img, txt, scale, targets)
        return loss, self.metrics(scale, [batch])

    def __call__(self, batches: list[dict]) -> tuple[torch.Tensor, dict]:
        if self.cached is None:
            return super().__call__(batches)
        batches = [self.finish(b) for b in batches]
        loss, scale = self.cached(batches)
        return loss, self.metrics(scale, batches)

    def metrics(self, scale: torch.Tensor, batches: list[dict]) -> dict:
        s = scale.item()
        out = {"temperature": 1.0 / s if s > 0 else math.inf, "logit_scale": s}
        if self.bias():
            out["logit_bias"] = self.bias()[0].item()
        if self.distill is not None and self.distill.last is not None:
            out["distill_kl"] = float(self.distill.last)  # the last micro-batch's (per micro-batch accumulation)
        return {**out, **{f"count/{k}": sum(b[n] for b in batches) for k, n in (
            ("skipped_samples", "n_skipped"), ("broken_shards", "n_broken_shards"), ("dropped_captions", "n_dropped"))}}

    def after(self) -> None:
        self.engine.clamp_(self.engine.module.logit_scale, 0.0, self.max_log_scale)


def main(argv: list[str]) -> Path:
    # config: every check before any process work
    args, cfg = parse_run_args(argv, CLIPRunConfig, __doc__.split("\n")[0], str(PROJECT_ROOT / "configs" / "clip.yaml"),
                               options=(("--init", f"initialises the image tower (and sets model.vision) from {KINDS}; "
                                                   "the last initialises both towers (and sets their sizes)"),))
    try:
        run = resolve(cfg, args.init)
    except ConfigError as e:
        if not args.print_config:
            raise
        print(dump_config(cfg), end="")  # what the files would have filled in is missing
        print(f"note: printed without what the tokenizer and --init decide: {e}", file=sys.stderr)
        return Path(cfg.run.out_dir)
    cfg = run.cfg
    out = Path(cfg.run.out_dir)
    start = start_run(cfg, args, {
        "tokenizer": (run.tokenizer.fingerprint, f"resume with the run's own: data.tokenizer={out / 'tokenizer'}")})
    if start is None:
        return out
    dist = start.dist

    # model: the same initial weights on every rank, then different patch-dropout streams per rank
    set_seed(cfg.train.seed)
    model = CLIP(cfg.model)
    if run.init is not None:
        run.init.load_into(model)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    set_seed(cfg.train.seed + dist.rank)

    # data
    views = build_multicrop(cfg.augment)
    dataset = PairDataset(run.train_source, views, languages=cfg.data.languages, rank=dist.rank,
                          world_size=dist.world_size, seed=cfg.train.seed, **cfg.data.stream_options())
    collate = CaptionCollate(run.tokenizer, views, cfg.data.languages, mode=cfg.data.caption_mode,
                             seed=cfg.train.seed + dist.rank, caption_weights=cfg.data.caption_weights)

    def loader(epoch: int):
        collate.set_epoch(epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.train.micro_batch_size, collate_fn=collate,
                                           num_workers=cfg.train.num_workers, generator=torch.Generator())

    stream = BatchStream(dataset, loader, cfg.train.micro_batch_size, cfg.train.num_workers)

    # engine: the towers' freeze windows, the optimizer groups they imply, the lr of each
    n_train = dataset.num_samples()
    per_epoch = n_train / global_batch(cfg.train, dist.world_size) if n_train else None
    f = cfg.freeze
    freeze = FreezeSchedule(model, {
        "visual.": freeze_steps(f.image_steps, f.image_epochs, per_epoch, "freeze.image"),
        "text.": freeze_steps(f.text_steps, f.text_epochs, per_epoch, "freeze.text"),
    }, unlocked={"visual.": f.image_unlocked_layers, "text.": f.text_unlocked_layers})
    groups, specs = param_groups(model, cfg.train.weight_decay, freeze, layer_decay(model, cfg.train.layer_decay))
    schedule = LRSchedule(cfg.train, dist.world_size, specs, rewarm=f.rewarm_steps)
    engine, monitor = open_run(cfg, start, model, groups, schedule)
    if dist.is_main:
        keep_tokenizer(run.tokenizer, run.tokenizer_dir, out)

    # loop
    max_block = cfg.loss_chunk_mib * 2 ** 20 // 4
    loss_fn = SigLipLoss(dist.rank, dist.world_size, max_block, cfg.siglip_exchange) if cfg.model.loss == "siglip" \
        else ClipLoss(dist.rank, dist.world_size, gather_with_grad=cfg.gather_with_grad, max_block=max_block)
    distill = None
    if run.teacher is not None:
        teacher = run.teacher.to(dist.device)
        distill = DistillTerm(teacher, DistillLoss(dist.rank, dist.world_size), cfg.distill.weight, cfg.augment.mean,
                              cfg.augment.std, languages=teacher.languages)
    step = ClipStep(engine, views, loss_fn, cfg.cached_accumulation, cfg.model.max_logit_scale, distill)
    chance = cfg.chance(dist.world_size)
    guard = Guard(cfg.guard, chance, settle_step=max(cfg.train.warmup_steps, freeze.settle_step()))
    trainer = Trainer(cfg, dist, engine, stream, step, monitor, schedule, freeze, guard, start.identity)
    if start.resume:
        trainer.resume()
    validator = Validator(run, dist, engine.module, monitor, chance) if run.val_source is not None else None
    if validator is not None:
        validator.ema = trainer.ema
    trainer.fit([(cfg.val_every, validator)] if validator is not None else [])
    trainer.save()
    if dist.is_main:
        save_clip(engine.module, out / "clip_ckpt.pt", tokenizer=run.tokenizer.fingerprint, languages=cfg.data.languages)
        if trainer.ema is not None:  # beside the trained weights: python -m clip.export takes either file
            save_clip(engine.module, out / "clip_ckpt_ema.pt", tokenizer=run.tokenizer.fingerprint,
                      languages=cfg.data.languages, state_dict=trainer.ema.weights())
        if validator is None:
            monitor.plot("loss.png", ["train/loss"], "CLIP training loss", cfg.model.loss, chance=chance,
                         chance_label="collapsed", labels={"train/loss": "train"})
        monitor.finish(f"CLIP done: {cfg.train.steps} steps (image tower frozen for {freeze.windows.get('visual.', 0)}, "
                       f"text for {freeze.windows.get('text.', 0)})", trainer.skip_totals(),
                       "clip_ckpt.pt, tokenizer/, loss.png")
    barrier(dist)
    return out


class Validator:
    """The held-out hook: loss and recall@k per language on rank 0 (the images decoded once, kept
    as tensors), then the loss and recall charts."""

    def __init__(self, run: ClipRun, dist, model: CLIP, monitor: Monitor, chance: float):
        cfg = run.cfg
        self.run, self.dist, self.model, self.monitor, self.chance = run, dist, model, monitor, chance
        self.langs = cfg.data.languages
        self.batch = cfg.contrastive_batch(dist.world_size)
        self.view = Decoded(eval_transform(cfg.model.vision.img_size, cfg.model.image_mean, cfg.model.image_std))
        self.rows = list(PairDataset(run.val_source, self.view, languages=self.langs, shuffle=False)) \
            if dist.is_main else []
        self.ema = None  # the trainer's weight average, evaluated beside the weights (val/ema/...)

    def __call__(self, step: int):
        if not self.dist.is_main:
            return None
        res = evaluate_heldout(self.model, self.run.tokenizer, self.rows, self.langs, self.dist.device,
                               loss_batch_size=self.batch)
        logs = {f"val/{k}": v for k, v in res.items()}
        if self.ema is not None:
            with self.ema.swapped():
                res = evaluate_heldout(self.model, self.run.tokenizer, self.rows, self.langs, self.dist.device,
                                       loss_batch_size=self.batch)
            logs.update({f"val/ema/{k}": v for k, v in res.items()})
        self.monitor.log(step, logs)
        self.plot()
        return None

    def plot(self) -> None:
        m = self.monitor
        name = "sigmoid loss" if self.run.cfg.model.loss == "siglip" else "symmetric InfoNCE"
        m.plot("loss.png", ["train/loss", "val/loss", "val/ema/loss"], "CLIP loss", name, chance=self.chance,
               chance_label="collapsed", labels={"train/loss": "train", "val/loss": "held-out",
                                                 "val/ema/loss": "held-out, weight average"})
        for direction, name in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
            keys = [f"val/{lang}/{direction}_R@{k}" for lang in self.langs for k in (1, 5)]
            m.plot(f"val_recall_{direction}.png", keys, f"held-out {name} recall@k per language (%)", "recall (%)",
                   chance=100.0 / len(self.rows), chance_label="chance R@1", scale=100.0,
                   labels={k: f"{k.split('/')[1]} R@{k.rsplit('@', 1)[1]}" for k in keys})
