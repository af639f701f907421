# Over 300 lines: the stage's one schema, each section with its checks, and the resolver that reads what it names.
"""The CLIP stage's configuration and everything decided before any process work.

:class:`CLIPRunConfig` is the stage's one schema; its ``__post_init__`` and those of its sections
refuse every impossible combination at load (one line, exit 2). :func:`resolve` then reads what
the config points at and makes the config agree with it: the tokenizer decides the vocabulary and
special ids (at the model's context length), ``--init`` the tower shapes it brings, ``augment``
the image normalisation the model records; the data sources and their held-out split are checked.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from clip.data.multicrop import MultiCropConfig
from clip.data.pairs import CaptionMode, extract_captions, split_rows
from clip.interop.init import KINDS, InitWeights, read_init
from clip.interop.teacher import KINDS as TEACHER_KINDS, Teacher, load_teacher
from clip.model.clip import CLIPConfig
from clip.model.tokens import HFTokenizer, load_text_tokenizer, text_config_for, unknown_share
from launch.runtime.config import ConfigError, GuardConfig, RunConfig, StreamConfig, TrainConfig, check_source, resolve_path


@dataclass(frozen=True)
class CLIPDataConfig(StreamConfig):
    """Image-text pairs: WebDataset shards (local, ``pipe:``, http; ``::`` mixes) or a JSONL / CSV
    manifest (+ image folder); how they are read: :class:`launch.runtime.config.StreamConfig`.

    ``caption_mode``: ``all`` = one caption per language per image, all positives (Parallel
    Multilingual CLIP); ``sample`` = one caption of a random language per image (KELIP's mixed
    bilingual batches). ``tokenizer``: our tokenizer's folder (a transformers text tower reads its
    own, ``model.hf_text.path``). Validation: ``val_source``, or else ``val_fraction`` of a manifest
    source held out by ``split_key`` (for the emoji set: the base emoji, so variants never straddle).
    """

    source: str = "data/emoji/captions.jsonl"
    languages: tuple[str, ...] = ("en", "ko")
    caption_mode: CaptionMode = "all"
    tokenizer: str = "runs/tokenizer"
    val_source: Optional[str] = None
    val_fraction: float = 0.15
    split_key: str = "base"
    split_seed: int = 0
    # caption_mode sample: the weight of each caption variant ("ko:translated", "ko", "translated"...;
    # clip.data.curation.online.draw_caption), {} = a random language, then a random caption
    caption_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if not self.languages or len(set(self.languages)) != len(self.languages):
            raise ValueError(f"languages must be distinct and at least one, got {list(self.languages)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in self.caption_weights.values()):
            raise ValueError(f"caption_weights must map variants to numbers >= 0, got {self.caption_weights}")
        if self.caption_weights and self.caption_mode != "sample":
            raise ValueError("caption_weights weigh the one caption drawn per image: they need caption_mode=sample")


@dataclass(frozen=True)
class FreezeConfig:
    """Towers frozen (lr 0, no gradient) at the start; projections and temperature still train.
    The window is the larger of ``*_steps`` and ``*_epochs`` x steps per epoch. ``*_unlocked_layers``:
    the last N blocks of the tower (and its final norm) train through the window (open_clip's
    ``--lock-*-unlocked-*``). ``rewarm_steps``: a tower leaving its window re-warms its learning rate
    linearly from 0 over this many steps (its Adam moments start there too)."""

    image_steps: int = 0
    image_epochs: float = 0.0
    text_steps: int = 0
    text_epochs: float = 0.0
    image_unlocked_layers: int = 0
    text_unlocked_layers: int = 0
    rewarm_steps: int = 0

    def __post_init__(self):
        for name in ("image_steps", "image_epochs", "text_steps", "text_epochs", "image_unlocked_layers",
                     "text_unlocked_layers", "rewarm_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class TeacherConfig:
    """A frozen teacher CLIP from local files (:func:`clip.interop.teacher.load_teacher`): ``teacher``
    its path (empty: none); ``teacher_tokenizer`` / ``teacher_act_layer``: for OpenAI-layout weights."""

    teacher: str = ""
    teacher_tokenizer: str = ""
    teacher_act_layer: Literal["gelu", "quick_gelu"] = "quick_gelu"


@dataclass(frozen=True)
class ImageTextDistillConfig(TeacherConfig):
    """Image-text distillation beside the contrastive loss (:class:`clip.model.distill.DistillTerm`):
    ``weight`` x KL between the teacher's and the student's image -> text and text -> image
    distributions over the global batch, on the caption slots in the languages the teacher reads."""

    weight: float = 1.0

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


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
    # (each recomputed in backward; clip.model.loss), so that its memory does not grow with local
    # batch x global batch; 0 = all rows at once.
    loss_chunk_mib: int = 64
    # With train.grad_accum > 1: "cached" contrasts all micro-batches of a step (launch.runtime.gradcache),
    # "per_micro_batch" each micro-batch on its own (fewer negatives, one forward per micro-batch).
    accumulation: Literal["cached", "per_micro_batch"] = "cached"
    # model.loss=siglip: how the captions reach the other ranks (clip.model.siglip): round the ring
    # (shift), both ways round (bidir), or one all_gather (gather)
    siglip_exchange: Literal["shift", "bidir", "gather"] = "shift"
    distill: ImageTextDistillConfig = field(default_factory=ImageTextDistillConfig)

    def __post_init__(self):
        if self.loss_chunk_mib < 0:
            raise ValueError(f"loss_chunk_mib must be >= 0 (0 = the loss in one block), got {self.loss_chunk_mib}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0, got {self.val_every}")
        if self.train.compile and self.model.patch_dropout > 0 and self.cached_accumulation:
            raise ValueError("train.compile with model.patch_dropout and cached accumulation: the second forward must "
                             "replay the first one's random draws, which a compiled graph does not promise; set one of "
                             "them off")
        if self.freeze.image_unlocked_layers > self.model.vision.depth:
            raise ValueError(f"freeze.image_unlocked_layers={self.freeze.image_unlocked_layers} is more than the image "
                             f"tower's {self.model.vision.depth} blocks")
        if self.model.text_tower == "gpt2" and self.freeze.text_unlocked_layers > self.model.text.depth:
            raise ValueError(f"freeze.text_unlocked_layers={self.freeze.text_unlocked_layers} is more than the text "
                             f"tower's {self.model.text.depth} blocks")
        if self.model.text_tower == "hf" and self.data.tokenizer != CLIPDataConfig.tokenizer:
            raise ValueError("data.tokenizer is not read with model.text_tower=hf: the encoder reads its own "
                             "tokenizer (model.hf_text.path)")
        for name in ("global_size", "local_size"):
            if getattr(self.augment, name) % self.model.vision.patch_size:
                raise ValueError(f"augment.{name}={getattr(self.augment, name)} is not divisible by the image tower's "
                                 f"patch size {self.model.vision.patch_size} (model.vision.patch_size)")

    @property
    def cached_accumulation(self) -> bool:
        return self.train.grad_accum > 1 and self.accumulation == "cached"

    def contrastive_batch(self, world_size: int) -> int:
        """Images contrasted with each other in one loss: a micro-batch of every rank, times the
        micro-batches of a step with cached accumulation."""
        return self.train.micro_batch_size * world_size * (self.train.grad_accum if self.cached_accumulation else 1)

    @property
    def caption_slots(self) -> int:
        return len(self.data.languages) if self.data.caption_mode == "all" else 1

    def chance(self, world_size: int) -> float:
        """The loss a collapsed model sits at (the divergence guard's level): uniform logits for
        InfoNCE, every logit at its best constant for the sigmoid loss."""
        from clip.model import loss, siglip

        images = self.contrastive_batch(world_size)
        if self.model.loss == "siglip":
            return siglip.chance_level(images)
        return loss.chance_level(images, self.caption_slots)


@dataclass(frozen=True)
class ClipRun:
    """A CLIP run as it will train (:func:`resolve`)."""

    cfg: CLIPRunConfig  # the model's shapes, ids and normalisation as the tokenizer, --init and augment decide
    tokenizer: object  # ours or the transformers encoder's, at the model's context length
    tokenizer_dir: Path
    init: Optional[InitWeights]
    train_source: object  # a source string or manifest rows
    val_source: object  # a source string, manifest rows, or None
    teacher: Optional[Teacher] = None  # distill.teacher, on the CPU


def note(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {text}", file=sys.stderr)


def keep_tokenizer(tokenizer, tokenizer_dir: Path, out: Path) -> None:
    """``<out>/tokenizer``: the run's tokenizer beside its checkpoints (once; rank 0 calls it):
    a copy of our tokenizer folder, or a transformers encoder's tokenizer files (not its weights)."""
    if (out / "tokenizer").exists():
        return
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(out / "tokenizer")
    else:
        shutil.copytree(tokenizer_dir, out / "tokenizer")


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def read_teacher(t: TeacherConfig, key: str = "distill.teacher") -> Teacher:
    """The teacher ``t`` names; every problem one :class:`ConfigError` line."""
    if not t.teacher:
        raise ConfigError(f"{key} is not set: name the teacher CLIP ({TEACHER_KINDS})")
    try:
        tok = resolve_path(t.teacher_tokenizer) if t.teacher_tokenizer else None
        return load_teacher(resolve_path(t.teacher), tok, t.teacher_act_layer)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"{key}={t.teacher}: {one_line(e)}") from None


def resolve(cfg: CLIPRunConfig, init: Optional[str]) -> ClipRun:
    """Read the tokenizer, the ``--init`` file and the data sources of ``cfg`` and return the run
    as it will train (module docstring); every problem is one :class:`ConfigError` line."""
    model = replace(cfg.model, image_mean=cfg.augment.mean, image_std=cfg.augment.std)
    if model.text_tower == "hf":
        tok_dir = Path(resolve_path(model.hf_text.path)) if model.hf_text.path else Path("")
        if not model.hf_text.path or not (tok_dir / "config.json").is_file():
            raise ConfigError(f"model.hf_text.path={model.hf_text.path!r}: not a local transformers model folder "
                              "(config.json, weights, tokenizer files as save_pretrained writes them)")
        key, hint = "model.hf_text.path", ""
        model = replace(model, hf_text=replace(model.hf_text, path=str(tok_dir)))
    else:
        tok_dir = Path(resolve_path(cfg.data.tokenizer))
        key = "data.tokenizer"
        hint = f"; train one with `python -m tokenizer.train --corpus en.txt ko.txt --out {tok_dir}`"
    try:
        tokenizer = load_text_tokenizer(tok_dir, model.text.context_length)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"{key}={tok_dir}: {one_line(e)}{hint}") from None
    model = replace(model, text=text_config_for(model.text, tokenizer))
    weights = None
    if init:
        try:
            weights = read_init(init, model)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"--init: {one_line(e)} (--init takes {KINDS})") from None
        if weights.target == "clip":
            note(f"model.vision, model.text sizes and model.vision_pool=token taken from {init}; activation "
                 f"{model.vision.act_layer}/{model.text.act_layer} from the config (OpenAI's and KELIP's weights use "
                 "quick_gelu: model.vision.act_layer=quick_gelu model.text.act_layer=quick_gelu)")
        elif weights.model.vision != model.vision:
            changed = [k for k in model.vision.__dataclass_fields__
                       if getattr(weights.model.vision, k) != getattr(model.vision, k)]
            note(f"model.vision taken from {init} ({', '.join(changed)} differ from the config)")
        model = weights.model
    try:
        cfg = replace(cfg, model=model)  # the checks of the config again, with the shapes the files decided
    except ValueError as e:
        raise ConfigError(f"--init {init}: {e}") from None
    train_src, val_src = split_sources(cfg.data)
    if model.text_tower == "hf":
        share = unknown_share(tokenizer, sample_captions(train_src, cfg.data.languages))
        if share > 0.5:
            raise ConfigError(f"model.hf_text.path={tok_dir}: its tokenizer maps {share:.0%} of a sample of the "
                              "captions mostly to its unknown token: it does not read these languages (a "
                              "SentencePiece model converted the wrong way?)")
    teacher = read_teacher(cfg.distill) if cfg.distill.teacher else None
    return ClipRun(cfg, tokenizer, tok_dir, weights, train_src, val_src, teacher)


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


def sample_captions(source, languages, n: int = 256) -> list[str]:
    """Up to ``n`` captions of the first samples of a source (manifest rows, or the first local shard)."""
    from mae.images.shards import is_remote, iter_shard_samples
    from mae.images.sources import resolve_source

    out = []
    if isinstance(source, list):
        rows = source
    else:
        kind, items = resolve_source(source)
        if kind == "records":
            rows = [r.get("row", {}) for r in items[:n]]
        elif items and not is_remote(items[0]):
            import json

            rows = []
            try:
                for s in iter_shard_samples(items[0]):
                    meta = json.loads(s["json"]) if s.get("json") else {}
                    rows.append(meta if isinstance(meta, dict) else {})
                    if s.get("txt") and languages:
                        rows[-1].setdefault(languages[0], s["txt"].decode("utf-8", "replace"))
                    if len(rows) >= n:
                        break
            except Exception:  # a broken shard: the training stream counts it; no sample here
                pass
        else:
            rows = []
    for row in rows[:n]:
        caps, _ = extract_captions(row, languages)
        out += [c for cs in caps.values() for c in cs]
    return out[:n]
