"""Stage 2: bilingual CLIP from the MAE encoder under DeepSpeed  ->  ``<out_dir>/clip_ckpt.pt``.

Run through the script ``launch/clip.py`` (``deepspeed launch/clip.py --init mae_ckpt.pt ...``).
KELIP: MAE-initialised ViT-B/32, multi-crop (224 + 96 px), 98K bilingual BPE, pre-LN GPT-2 text
tower (12 x 512 x 8). Parallel Multilingual CLIP: each image carries captions in several languages,
the image is encoded once per crop and every translation is a positive (``data.caption_mode: all``),
and pretrained towers are frozen for the first half epoch (``freeze.image_epochs: 0.5``).
AdamW (0.9, 0.98, eps 1e-6), wd 0.2 (not on biases, norms, embeddings, temperature).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import torch

from clip.augment import MultiCropConfig, build_multicrop, finish_images
from clip.data import CaptionCollate, CaptionMode, build_pair_dataset, split_rows
from clip.evaluate import evaluate_heldout
from clip.hf_text import HFTokenizer
from clip.loss import ClipLoss
from clip.model import CLIP, CLIPConfig, load_visual_state, save_clip
from clip.openai_layout import init_from_openai
from clip.text import text_config_for
from clip.timm_vit import load_image_init
from launch.cli import parse_run_args, start_run
from launch.config import PROJECT_ROOT, ConfigError, GuardConfig, RunConfig, StreamConfig, TrainConfig, resolve_path
from launch.dist import barrier, set_seed
from launch.gradcache import CachedContrastiveStep
from launch.guard import Guard
from launch.loop import Trainer, check_source, fingerprint, prepare_run_dir, summary_line
from launch.monitor import Monitor
from launch.optim import (FreezeSchedule, autocast, build_engine, clamp_parameter_, freeze_steps, global_batch,
                          maybe_compile)
from launch.stream import BatchStream
from mae.data import eval_transform
from mae.model import load_encoder_checkpoint
from mae.vit import VisionTransformer
from tokenizer import BilingualTokenizer


@dataclass(frozen=True)
class CLIPDataConfig(StreamConfig):
    """Image-text pairs: WebDataset shards (local, ``pipe:``, http; ``::`` mixes) or a JSONL / CSV
    manifest (+ image folder); how they are read: :class:`launch.config.StreamConfig`.

    ``caption_mode``: ``all`` = one caption per language per image, all positives (Parallel
    Multilingual CLIP); ``sample`` = one caption of a random language per image (KELIP's mixed
    bilingual batches). Validation: ``val_source``, or else ``val_fraction`` of a manifest source
    held out by ``split_key`` (for the emoji set: the base emoji, so variants never straddle).
    """

    source: str = "data/emoji/captions.jsonl"
    languages: tuple[str, ...] = ("en", "ko")
    caption_mode: CaptionMode = "all"
    tokenizer: str = "runs/tokenizer"
    val_source: Optional[str] = None
    val_fraction: float = 0.15
    split_key: str = "base"
    split_seed: int = 0


@dataclass(frozen=True)
class FreezeConfig:
    """Towers frozen (lr 0, no gradient) at the start; projections and temperature still train.
    The window is the larger of ``*_steps`` and ``*_epochs`` x steps per epoch."""

    image_steps: int = 0
    image_epochs: float = 0.0
    text_steps: int = 0
    text_epochs: float = 0.0


@dataclass(frozen=True)
class CLIPRunConfig:
    """The whole stage-2 run."""

    model: CLIPConfig = field(default_factory=CLIPConfig)
    augment: MultiCropConfig = field(default_factory=MultiCropConfig)
    data: CLIPDataConfig = field(default_factory=CLIPDataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2, warmup_steps=10))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/clip"))
    guard: GuardConfig = field(default_factory=GuardConfig)
    val_every: int = 50  # validation loss + R@k per language every N steps (and at the end); 0 = off
    gather_with_grad: bool = True
    # The contrastive loss takes this rank's rows in chunks of at most this many MiB of fp32 logits
    # (each recomputed in backward; clip/loss.py), so that its memory does not grow with
    # local batch x global batch; 0 = all rows at once.
    loss_chunk_mib: int = 64
    # With train.grad_accum > 1: "cached" contrasts all micro-batches of a step (launch.gradcache),
    # "per_micro_batch" each micro-batch on its own (fewer negatives, one forward per micro-batch).
    accumulation: Literal["cached", "per_micro_batch"] = "cached"

    def __post_init__(self):
        if self.loss_chunk_mib < 0:
            raise ValueError(f"loss_chunk_mib must be >= 0 (0 = the loss in one block), got {self.loss_chunk_mib}")


def load_tokenizer(folder: Path, key: str = "data.tokenizer") -> BilingualTokenizer:
    try:
        return BilingualTokenizer.from_dir(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}={folder}: {e}; train one with `python -m tokenizer.train --corpus en.txt ko.txt "
                          f"--out {folder}`") from None


def split_sources(data: CLIPDataConfig):
    """(train source, val source or rows, or None): a held-out split of a manifest, or the configured
    sources; every problem with them is one line naming the key."""
    source = resolve_path(data.source)
    _, records = check_source(source, "data.source", data)
    if data.val_source:
        check_source(resolve_path(data.val_source), "data.val_source")
        return source, resolve_path(data.val_source)
    if source.endswith((".jsonl", ".csv", ".tsv")) and data.val_fraction > 0:
        try:  # the manifest's rows as check_source read them: no second pass over the file
            train, val = split_rows([r["row"] for r in records], data.val_fraction, data.split_key, data.split_seed)
        except ValueError as e:
            raise ConfigError(f"data.split_key: {e}") from None
        if not train or not val:
            raise ConfigError(f"data.val_fraction={data.val_fraction} leaves an empty split of {source}")
        return train, val
    return source, None


@dataclass(frozen=True)
class InitState:
    """What ``--init`` loads: ``visual`` (an MAE encoder or a timm ViT into the image tower) or
    ``clip`` (a whole CLIP from OpenAI's layout), and the state dict under our names, with what it is."""

    target: Literal["visual", "clip"]
    state: dict
    what: str = "MAE encoder"


def load_hf_tokenizer(model: CLIPConfig) -> tuple[HFTokenizer, Path]:
    """The tokenizer of ``model.hf_text.path`` (a transformers text tower reads its own captions)."""
    folder = Path(resolve_path(model.hf_text.path)) if model.hf_text.path else Path("")
    if not model.hf_text.path or not (folder / "config.json").is_file():
        raise ConfigError(f"model.hf_text.path={model.hf_text.path!r}: not a local transformers model folder "
                          "(config.json, weights, tokenizer files as save_pretrained writes them)")
    try:
        return HFTokenizer.from_dir(folder, model.text.context_length), folder
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"model.hf_text.path={folder}: {' '.join(str(e).split())}") from None


INIT_KINDS = ("an MAE encoder export (mae_ckpt.pt or its safetensors folder), a timm ViT state dict (.safetensors, "
              ".pt, .pth, .bin), or a CLIP checkpoint in OpenAI's / open_clip's layout")


def resolve(cfg: CLIPRunConfig, init: Optional[str]):
    """The run config as it will train: the text tower's vocabulary and special ids from the
    tokenizer (ours, or the transformers encoder's own with ``model.text_tower: hf``), the image
    tower's shape from the ``--init`` checkpoint (an MAE export or a timm ViT state dict; for a CLIP
    in OpenAI's layout, both towers' shapes). A config cannot disagree with them. Returns ``(cfg,
    tokenizer, tokenizer folder, InitState or None)``."""
    if cfg.model.text_tower == "hf":
        tokenizer, tok_dir = load_hf_tokenizer(cfg.model)
        model = replace(cfg.model, hf_text=replace(cfg.model.hf_text, path=str(tok_dir)))
    else:
        tok_dir = Path(resolve_path(cfg.data.tokenizer))
        tokenizer = load_tokenizer(tok_dir)
        model = cfg.model
    model = replace(model, text=text_config_for(model.text, tokenizer))
    if not init:
        return replace(cfg, model=model), tokenizer, tok_dir, None
    if cfg.model.text_tower != "hf":  # a whole CLIP brings its own text tower: ours only
        try:
            found = init_from_openai(model, init)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--init: {e}") from None
        if found is not None:  # a whole CLIP in OpenAI's layout (OpenAI, open_clip ViT-B-32, KELIP)
            if os.environ.get("RANK", "0") == "0":
                print(f"note: model.vision, model.text sizes and model.vision_pool=token taken from {init}; activation "
                      f"{model.vision.act_layer}/{model.text.act_layer} from the config (OpenAI's and KELIP's weights "
                      "use quick_gelu: model.vision.act_layer=quick_gelu model.text.act_layer=quick_gelu)",
                      file=sys.stderr)
            return replace(cfg, model=found[0]), tokenizer, tok_dir, InitState("clip", found[1])
    try:
        if Path(init).is_dir():  # a safetensors export folder (python -m clip.export --format safetensors)
            (vision, state), what = load_encoder_checkpoint(init), "MAE encoder"
        else:
            vision, state, what = load_image_init(init, model.vision)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--init: {e} (--init takes {INIT_KINDS})") from None
    if vision != model.vision:
        changed = [k for k in vision.__dataclass_fields__ if getattr(vision, k) != getattr(model.vision, k)]
        if os.environ.get("RANK", "0") == "0":
            print(f"note: model.vision taken from {init} ({', '.join(changed)} differ from the config)",
                  file=sys.stderr)
    model = replace(model, vision=vision)
    with torch.device("meta"):  # check every key and shape now, before any process work
        tower = VisionTransformer(vision, global_pool=model.vision_pool)
    try:
        load_visual_state(tower, vision, state, init, what)
    except ValueError as e:
        raise ConfigError(f"--init: {e}") from None
    return replace(cfg, model=model), tokenizer, tok_dir, InitState("visual", state, what)


def main(argv: list[str]) -> Path:
    args, cfg = parse_run_args(argv, CLIPRunConfig, __doc__.split("\n")[0],
                               str(PROJECT_ROOT / "configs" / "clip.yaml"),
                               options=(("--init", f"initialises the image tower (and sets model.vision) from {INIT_KINDS}; "
                                                   "the last initialises both towers (and sets their sizes)"),))
    cfg, tokenizer, tok_dir, init_state = resolve(cfg, args.init)
    if cfg.train.compile and cfg.model.patch_dropout > 0 and cfg.train.grad_accum > 1 and cfg.accumulation == "cached":
        raise ConfigError("train.compile with model.patch_dropout and cached accumulation: the second forward must "
                          "replay the first one's random draws, which a compiled graph does not promise; "
                          "set one of them off")
    train_src, val_rows = split_sources(cfg.data)
    dist = start_run(cfg, args.print_config, args.resume)
    if dist is None:
        return Path(cfg.run.out_dir)

    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = CLIP(cfg.model)
    if init_state is not None and init_state.target == "clip":
        model.load_state_dict(init_state.state, strict=True)  # shapes checked in resolve
    elif init_state is not None:
        load_visual_state(model.visual, cfg.model.vision, init_state.state, args.init, init_state.what)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    maybe_compile(model, cfg.train)
    set_seed(cfg.train.seed + dist.rank)  # different patch-dropout streams per rank

    dataset = build_pair_dataset(train_src, build_multicrop(cfg.augment), languages=cfg.data.languages,
                                 rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed,
                                 **cfg.data.stream_options())
    n_train = dataset.num_samples()
    per_epoch = n_train / global_batch(cfg.train, dist.world_size) if n_train else None
    f = cfg.freeze
    freeze = FreezeSchedule(model, {
        "visual.": freeze_steps(f.image_steps, f.image_epochs, per_epoch, "freeze.image"),
        "text.": freeze_steps(f.text_steps, f.text_epochs, per_epoch, "freeze.text"),
    })
    engine, ds_cfg, schedule = build_engine(model, cfg.train, dist, freeze)
    out = prepare_run_dir(cfg.run, cfg, dist, {"ds_config.json": ds_cfg})
    monitor = Monitor(out, dist, resume=args.resume, wandb=cfg.run.wandb)
    monitor.start(cfg, model)
    if dist.is_main and not (out / "tokenizer").exists():
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(out / "tokenizer")  # the tokenizer files only, not the encoder's weights
        else:
            shutil.copytree(tok_dir, out / "tokenizer")

    collate = CaptionCollate(tokenizer, cfg.data.languages, mode=cfg.data.caption_mode, seed=cfg.train.seed + dist.rank,
                             context_length=cfg.model.text.context_length)

    def loader(epoch: int):
        collate.set_epoch(epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.train.micro_batch_size, collate_fn=collate,
                                           num_workers=cfg.train.num_workers, generator=torch.Generator())

    stream = BatchStream(dataset, loader, cfg.train.micro_batch_size, cfg.train.num_workers)
    loss_fn = ClipLoss(dist.rank, dist.world_size, gather_with_grad=cfg.gather_with_grad,
                       max_block=cfg.loss_chunk_mib * 2 ** 20 // 4)
    net: CLIP = engine.module

    def metrics(scale: torch.Tensor, batches: list[dict]) -> dict:
        s = scale.item()
        return {"temperature": 1.0 / s if s > 0 else math.inf, "logit_scale": s,
                **{f"count/{k}": sum(b[n] for b in batches) for k, n in (
                    ("skipped_samples", "n_skipped"), ("broken_shards", "n_broken_shards"),
                    ("dropped_captions", "n_dropped"))}}

    def views(batch: dict) -> dict:  # uint8 crops normalised / device crops made, on the device
        return {**batch, "images": finish_images(batch["images"], cfg.augment)}

    def step_fn(batch):
        batch = views(batch)
        img, txt, scale = engine(batch["images"], batch["tokens"], batch["text_mask"])
        return loss_fn(img, txt, batch["text_mask"], scale), metrics(scale, [batch])

    cached = CachedContrastiveStep(engine, loss_fn, lambda: autocast(cfg.train, dist.device))

    def cached_step(batches):
        batches = [views(b) for b in batches]
        loss, scale = cached(batches)
        return loss, metrics(scale, batches)

    whole_step = cached_step if cfg.train.grad_accum > 1 and cfg.accumulation == "cached" else None

    langs = cfg.data.languages
    contrastive_batch = cfg.train.micro_batch_size * dist.world_size * (cfg.train.grad_accum if whole_step else 1)
    n_slots = len(langs) if cfg.data.caption_mode == "all" else 1
    # uniform logits: image->text ln(B C) (C positives among B C captions), text->image ln B
    chance = 0.5 * (math.log(contrastive_batch * n_slots) + math.log(contrastive_batch))
    guard = Guard(cfg.guard, chance, settle_step=max(cfg.train.warmup_steps, *freeze.windows.values(), 0))
    run_tok = out / "tokenizer"
    identity = {"model config": (fingerprint(cfg.model), f"resume with its config: --config {out / 'config.yaml'}"),
                "tokenizer": (tokenizer.fingerprint, f"resume with the run's own: data.tokenizer={run_tok}")}
    max_log_scale = math.log(cfg.model.max_logit_scale)
    trainer = Trainer(engine, stream, step_fn, cfg.train, cfg.run, dist, monitor, schedule, freeze, guard, identity,
                      whole_step, after_step=lambda: clamp_parameter_(net.logit_scale, 0.0, max_log_scale))
    if args.resume:
        trainer.resume()

    hooks = []
    if val_rows is not None and cfg.val_every > 0:
        val_tf = eval_transform(cfg.model.vision.img_size, cfg.augment.mean, cfg.augment.std)
        if dist.is_main:  # decoded once, kept as tensors for every validation
            val_rows = list(build_pair_dataset(val_rows, val_tf, languages=langs, shuffle=False))

        def validate(step: int):
            if not dist.is_main:
                return None
            res = evaluate_heldout(net, tokenizer, val_rows, langs, dist.device, transform=val_tf,
                                   loss_batch_size=contrastive_batch)
            return {f"val/{k}": v for k, v in res.items()}

        def plot(step: int):
            monitor.plot("loss.png", ["train/loss", "val/loss"], "CLIP loss", "symmetric InfoNCE",
                         chance=chance, labels={"train/loss": "train", "val/loss": "held-out"})
            keys = [f"val/{lang}/{d}_R@1" for lang in langs for d in ("image_to_text", "text_to_image")]
            monitor.plot("val_recall.png", keys, "held-out recall@1 per language", "R@1",
                         chance=1.0 / len(val_rows), labels={k: k[4:] for k in keys})

        hooks += [(cfg.val_every, validate), (cfg.val_every, plot)]
    trainer.fit(hooks)
    trainer.save()
    if dist.is_main:
        save_clip(net, out / "clip_ckpt.pt", tokenizer=tokenizer.fingerprint, languages=langs)
        if not hooks:
            monitor.plot("loss.png", ["train/loss"], "CLIP training loss", "symmetric InfoNCE",
                         chance=chance, labels={"train/loss": "train"})
        last = {k: v for r in monitor.history() for k, v in r.items() if k.startswith("val/")}
        monitor.close()
        print(f"CLIP done: {cfg.train.steps} steps (image tower frozen for {freeze.windows.get('visual.', 0)}, "
              f"text for {freeze.windows.get('text.', 0)})")
        if last:
            print("held-out: " + ", ".join(f"{k[4:]}={v:.4f}" for k, v in sorted(last.items())))
        print(summary_line(trainer.skip_totals()))
        print(f"outputs: {out}/  (clip_ckpt.pt, tokenizer/, loss.png, metrics.jsonl, tb/, checkpoints/)")
    barrier(dist)
    return out
