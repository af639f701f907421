"""Stage 2: bilingual CLIP from the MAE encoder under DeepSpeed  ->  ``<out_dir>/clip_ckpt.pt``.

    deepspeed launch/clip.py --init runs/mae/mae_ckpt.pt [--config configs/clip.yaml] [key=value ...]
    deepspeed --num_gpus 2 launch/clip.py --init mae_ckpt.pt --config configs/clip_tiny.yaml

KELIP: MAE-initialised ViT-B/32, multi-crop (224 + 96 px), 98K bilingual BPE, pre-LN GPT-2 text
tower (12 x 512 x 8). Parallel Multilingual CLIP: each image carries captions in several languages,
the image is encoded once per crop and every translation is a positive (``data.caption_mode: all``),
and pretrained towers are frozen for the first half epoch (``freeze.image_epochs: 0.5``).
AdamW (0.9, 0.98, eps 1e-6), wd 0.2 (not on biases, norms, embeddings, temperature).
"""
if __name__ == "__main__":
    # `deepspeed launch/clip.py` runs this file as a script, which puts launch/ first on sys.path,
    # where this very file would shadow the `clip` package. Put the project root there instead.
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from clip.augment import MultiCrop, MultiCropConfig, eval_transform
from clip.data import CaptionCollate, build_pair_dataset, split_rows
from clip.loss import ClipLoss
from clip.model import CLIP, CLIPConfig, load_mae_encoder, save_clip
from launch import runtime as rt
from launch.config import PROJECT_ROOT, ConfigError, RunConfig, TrainConfig, load_config, resolve_path
from mae.data import iter_manifest
from tokenizer import BilingualTokenizer


@dataclass(frozen=True)
class CLIPDataConfig:
    """Image-text pairs: WebDataset shards or a JSONL manifest (+ image folder).

    ``caption_mode``: ``all`` = one caption per language per image, all positives (Parallel
    Multilingual CLIP); ``sample`` = one caption of a random language per image (KELIP's mixed
    bilingual batches). Validation: ``val_source``, or else ``val_fraction`` of a manifest source
    held out by ``split_key`` (for the emoji set: the base emoji, so variants never straddle).
    """

    source: str = "data/emoji/captions.jsonl"
    languages: tuple[str, ...] = ("en", "ko")
    caption_mode: str = "all"
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
    val_every: int = 50  # validation loss + R@k per language every N steps (and at the end); 0 = off
    gather_with_grad: bool = True


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "clip.yaml"), help="run YAML (default: %(default)s)")
    p.add_argument("--init", default=None, help="mae_ckpt.pt from stage 1: initialises the image tower")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


def load_tokenizer(path: str) -> BilingualTokenizer:
    folder = Path(resolve_path(path))
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer at {folder}: train one with `python -m tokenizer.train --corpus en.txt ko.txt "
                          f"--out {path}` or set data.tokenizer=DIR")
    return BilingualTokenizer.from_dir(str(folder))


def split_sources(data: CLIPDataConfig):
    """(train source, val source or None): rows of a held-out split, or the configured sources."""
    source = resolve_path(data.source)
    if data.val_source:
        return source, resolve_path(data.val_source)
    if source.endswith(".jsonl") and data.val_fraction > 0:
        train, val = split_rows(list(iter_manifest(source)), data.val_fraction, data.split_key, data.split_seed)
        if not train or not val:
            raise ConfigError(f"data.val_fraction={data.val_fraction} leaves an empty split of {source}")
        return train, val
    return source, None


class Validator:
    """Held-out loss and retrieval R@k per language, on rank 0 with a single centre crop."""

    def __init__(self, rows, cfg: CLIPRunConfig, tokenizer: BilingualTokenizer, dist: rt.Dist):
        from clip.metrics import retrieval_metrics

        self.metrics_fn = retrieval_metrics
        self.cfg, self.dist, self.tokenizer = cfg, dist, tokenizer
        tf = eval_transform(cfg.model.vision.img_size, cfg.augment.mean, cfg.augment.std)
        ds = build_pair_dataset(rows, tf, languages=cfg.data.languages, shuffle=False)
        collate = CaptionCollate(tokenizer, cfg.data.languages, mode="all", seed=0,
                                 context_length=cfg.model.text.context_length)
        self.batches = list(torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=collate))
        self.n = sum(len(b["keys"]) for b in self.batches)

    def batch_loss(self, img, txt, mask, scale) -> float:
        """Mean InfoNCE over held-out batches as large as a training step's contrastive batch
        (micro batch x ranks), drawn by a fixed random partition, as open_clip's val loss: the
        same scale and chance level as ``train/loss``. (Over all N held-out rows at once the loss
        would sit near ln N instead and not be comparable with the training curve.)"""
        n, bs = len(img), self.cfg.train.micro_batch_size * self.dist.world_size
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(img.device)
        chunks = [perm[i:i + bs] for i in range(0, n, bs)]
        if len(chunks) > 1 and len(chunks[-1]) < bs:
            chunks.pop()  # a short last batch would have an easier (lower-chance) loss
        total = sum(ClipLoss()(img[c][None], txt[c], mask[c], scale).item() * len(c) for c in chunks)
        return total / sum(len(c) for c in chunks)

    @torch.no_grad()
    def __call__(self, model: CLIP, dtype: torch.dtype) -> dict:
        was_training = model.training
        model.eval()
        imgs, txts, masks = [], [], []
        for b in self.batches:
            b = rt.to_device(b, self.dist.device, dtype)
            imgs.append(model.encode_crops(b["images"])[0].float())  # (B, E)
            txts.append(model.encode_captions(b["tokens"], b["text_mask"]).float())  # (B, C, E)
            masks.append(b["text_mask"])
        model.train(was_training)
        img, txt, mask = torch.cat(imgs), torch.cat(txts), torch.cat(masks)  # (N, E), (N, C, E), (N, C)
        out = {"val/loss": self.batch_loss(img, txt, mask, model.scale().float())}
        for c, lang in enumerate(self.cfg.data.languages):
            has = mask[:, c]
            m = self.metrics_fn(img, txt[has, c], torch.nonzero(has).squeeze(1), ks=(1, 5, 10))
            out[f"val/{lang}/image_retrieval_recall@1"] = m["image_retrieval_recall@1"]
            out[f"val/{lang}/text_retrieval_recall@1"] = m["text_retrieval_recall@1"]
            out[f"val/{lang}/text_retrieval_recall@5"] = m["text_retrieval_recall@5"]
        return out


def main(argv: list[str]) -> Path:
    args = parse_args(argv)
    cfg = load_config(CLIPRunConfig, args.config, args.overrides)
    if cfg.data.caption_mode not in ("all", "sample"):
        raise ConfigError(f"data.caption_mode must be 'all' or 'sample', got {cfg.data.caption_mode!r}")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    text = replace(cfg.model.text, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)
    cfg = replace(cfg, model=replace(cfg.model, text=text))  # the tokenizer decides vocab and special ids
    train_src, val_src = split_sources(cfg.data)
    dist = rt.init_distributed()
    rt.check_precision(cfg.train, dist.device)

    rt.set_seed(cfg.train.seed)  # same initial weights on every rank
    model = CLIP(cfg.model)
    if args.init:
        load_mae_encoder(model, args.init)
    rt.set_seed(cfg.train.seed + dist.rank)  # different augmentation streams per rank

    dataset = build_pair_dataset(train_src, MultiCrop(cfg.augment), languages=cfg.data.languages,
                                 rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed)
    n_train = dataset.num_samples()
    steps_per_epoch = n_train / rt.global_batch(cfg.train, dist.world_size) if n_train else None

    def window(steps: int, epochs: float, what: str) -> int:
        if epochs > 0 and steps_per_epoch is None:
            raise ConfigError(f"freeze.{what}_epochs needs a source of known size; use freeze.{what}_steps")
        return max(steps, math.ceil(epochs * steps_per_epoch) if epochs > 0 else 0)

    freeze_image = window(cfg.freeze.image_steps, cfg.freeze.image_epochs, "image")
    freeze_text = window(cfg.freeze.text_steps, cfg.freeze.text_epochs, "text")
    groups = rt.param_groups(model, cfg.train.weight_decay, frozen={"visual.": freeze_image, "text.": freeze_text})
    engine, ds_cfg = rt.build_engine(model, groups, cfg.train, dist)
    out = rt.prepare_run_dir(cfg.run, cfg, dist, {"ds_config.json": ds_cfg})
    monitor = rt.Monitor(out, dist, resume=args.resume)
    if dist.is_main:
        shutil.copytree(Path(resolve_path(cfg.data.tokenizer)), out / "tokenizer", dirs_exist_ok=True)

    collate = CaptionCollate(tokenizer, cfg.data.languages, mode=cfg.data.caption_mode, seed=cfg.train.seed + dist.rank,
                             context_length=cfg.model.text.context_length)

    def loader(epoch: int):
        dataset.set_epoch(epoch)
        collate.set_epoch(epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.train.micro_batch_size, drop_last=True,
                                           num_workers=cfg.train.num_workers, collate_fn=collate)

    start = rt.resume_checkpoint(engine, out) if args.resume else 0
    loss_fn = ClipLoss(dist.rank, dist.world_size, gather_with_grad=cfg.gather_with_grad)
    net: CLIP = engine.module

    def step_fn(batch, step):
        # Frozen towers get no gradient at all (cheaper than a zero update, and their Adam state
        # stays empty); their learning rate is also 0 in the window, so they cannot move.
        net.visual.requires_grad_(step >= freeze_image)
        net.text.requires_grad_(step >= freeze_text)
        img, txt, scale = engine(batch["images"], batch["tokens"], batch["text_mask"])
        loss = loss_fn(img.float(), txt.float(), batch["text_mask"], scale.float())
        return loss, {"temperature": 1.0 / scale.item(), "logit_scale": scale.item(),
                      "count/skipped_samples": float(batch["n_skipped"]),
                      "count/dropped_captions": float(batch["n_dropped"])}

    hooks = []
    if val_src is not None and cfg.val_every > 0:
        validator = Validator(val_src, cfg, tokenizer, dist) if dist.is_main else None

        def validate(step: int):
            res = validator(net, rt.model_dtype(cfg.train)) if dist.is_main else None
            if dist.is_main:
                monitor.log(step, res)
                monitor.plot("loss.png", ["train/loss", "val/loss"], "CLIP loss (train vs held-out)")
                keys = [f"val/{lang}/image_retrieval_recall@1" for lang in cfg.data.languages]
                monitor.plot("val_recall.png", keys + [k.replace("image_", "text_") for k in keys],
                             "held-out R@1 per language")
            rt.barrier(dist)
            return None

        hooks.append((cfg.val_every, validate))
    batches = rt.infinite_batches(loader, start_epoch=rt.epochs_done(start, dataset.num_samples(), cfg.train, dist))
    rt.train_loop(engine, batches, step_fn, cfg.train, cfg.run, dist, monitor,
                  start_step=start, every=hooks)
    rt.save_checkpoint(engine, out, cfg.train.steps, cfg.run.keep_last, dist)
    if dist.is_main:
        save_clip(net, out / "clip_ckpt.pt")
        if not hooks:
            monitor.plot("loss.png", ["train/loss"], "CLIP training loss")
        last = {k: v for r in monitor.history() for k, v in r.items() if k.startswith("val/")}
        monitor.close()
        print(f"CLIP done: {cfg.train.steps} steps (image tower frozen for {freeze_image}, text for {freeze_text})")
        if last:
            print("held-out: " + ", ".join(f"{k[4:]}={v:.4f}" for k, v in sorted(last.items())))
        print(f"outputs: {out}/  (clip_ckpt.pt, tokenizer/, loss.png, metrics.jsonl, tb/, checkpoints/)")
    rt.barrier(dist)
    return out


if __name__ == "__main__":
    rt.run_main(main)
