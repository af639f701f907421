"""The text-only distillation stage's configuration and everything decided before any process work.

:class:`DistillTextRunConfig` is the stage's one schema (defaults < YAML < ``key=value``; unknown
keys, wrong types and impossible values are one line, exit 2). :func:`resolve` then reads what the
config points at and makes the config agree with it: the teacher (``distill.teacher``) decides the
embedding width the student projects into, the student's tokenizer its vocabulary and special ids,
``model.init_from_teacher`` the tower's sizes; the parallel data is read and split; a teacher that is
not a CLIP, a student whose width cannot reach the teacher's and a stale teacher cache are refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from clip.data.parallel import distinct_targets, read_pairs, split_pairs
from clip.interop.teacher import Teacher
from clip.interop.teacher_cache import check_text_cache
from clip.model.clip import TextTower
from clip.model.hf_text import HFTextConfig
from clip.model.text import TextConfig
from clip.model.tokens import load_text_tokenizer, text_config_for
from launch.runtime.config import ConfigError, GuardConfig, RunConfig, TrainConfig, resolve_path
from launch.stages.clip_config import TeacherConfig, note, one_line, read_teacher


@dataclass(frozen=True)
class StudentConfig:
    """The student: a text tower (``gpt2``: ours on ``data.tokenizer``, sizes in ``text``; ``hf``: the
    transformers encoder in ``hf_text.path`` with its own tokenizer) and a bias-free linear projection
    into the teacher's embedding space (``projection: false``: none, the tower's width must then be
    the teacher's). ``embed_dim``: 0 = the teacher's width; any other value must equal it.
    ``init_from_teacher``: start the tower and projection from the teacher's (our own teacher, same
    tokenizer; its sizes replace ``text``'s)."""

    text_tower: TextTower = "gpt2"
    text: TextConfig = field(default_factory=TextConfig)
    hf_text: HFTextConfig = field(default_factory=HFTextConfig)
    projection: bool = True
    embed_dim: int = 0
    init_from_teacher: bool = False

    def __post_init__(self):
        if self.embed_dim < 0:
            raise ValueError(f"embed_dim must be >= 0 (0 = the teacher's width), got {self.embed_dim}")
        if self.init_from_teacher and self.text_tower != "gpt2":
            raise ValueError("init_from_teacher copies our text tower: it needs text_tower gpt2")


@dataclass(frozen=True)
class ParallelDataConfig:
    """Parallel sentences (:mod:`clip.data.parallel`: a TSV / CSV / JSONL with a column per language,
    ``{lang}``-patterned line-aligned text files, ``::`` joins several). ``languages``: the first is
    the teacher's (its sentences are the targets), every one is fed to the student. Held out:
    ``val_fraction`` of the rows by a hash of ``split_key`` (empty: the teacher-language sentence;
    ``base`` with the emoji manifest holds out the CLIP stage's held-out emoji), at most ``val_max``
    evaluated."""

    source: str = "data/parallel/en_ko.tsv"
    languages: tuple[str, ...] = ("en", "ko")
    tokenizer: str = "runs/tokenizer"
    val_fraction: float = 0.05
    split_key: str = ""
    split_seed: int = 0
    val_max: int = 1000

    def __post_init__(self):
        if len(self.languages) < 2 or len(set(self.languages)) != len(self.languages):
            raise ValueError(f"languages must be two or more, distinct, the teacher's first: {list(self.languages)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_max < 0:
            raise ValueError(f"val_max must be >= 0, got {self.val_max}")


@dataclass(frozen=True)
class DistillConfig(TeacherConfig):
    """The teacher and the objective. ``teacher``: a CLIP from local files
    (:func:`clip.interop.teacher.load_teacher`); ``teacher_tokenizer`` / ``teacher_act_layer``: for
    OpenAI-layout weights. ``loss``: per sentence, ``mse`` (squared distance of the student's
    projection to the teacher's unit vector) or ``cosine`` (1 - cos) (:func:`clip.model.distill.text_distance`),
    averaged over the student's languages; ``keep_teacher_language: false`` drops the term of the
    teacher's own language. ``cache``: a safetensors file of the teacher's embeddings of every
    training target, written on the first run and read back after (keyed by the sentences and the
    teacher's weights; a stale one is refused); empty: the teacher runs in every step."""

    loss: Literal["mse", "cosine"] = "mse"
    keep_teacher_language: bool = True
    cache: str = ""
    teacher_batch_size: int = 256

    def __post_init__(self):
        if self.teacher_batch_size < 1:
            raise ValueError(f"teacher_batch_size must be >= 1, got {self.teacher_batch_size}")


@dataclass(frozen=True)
class DistillTextRunConfig:
    """The whole text-only distillation run."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    model: StudentConfig = field(default_factory=StudentConfig)
    data: ParallelDataConfig = field(default_factory=ParallelDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, warmup_steps=10, micro_batch_size=64))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/distill_text"))
    guard: GuardConfig = field(default_factory=GuardConfig)
    val_every: int = 50  # held-out cosines every N steps (and at the end); 0 = off

    def __post_init__(self):
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0, got {self.val_every}")


@dataclass(frozen=True)
class DistillRun:
    """A distillation run as it will train (:func:`resolve`)."""

    cfg: DistillTextRunConfig  # the student's sizes and ids as the teacher and tokenizer decide
    teacher: Teacher
    tokenizer: object  # the student's, at its context length
    tokenizer_dir: Path
    embed_dim: int  # the teacher's width
    train_rows: list  # each with "target": its index in `targets`
    val_rows: list
    targets: list  # the distinct teacher-language sentences of the training rows
    cache: Optional[str]  # the resolved cache path, or None
    cache_ready: bool  # it exists and fits


def resolve(cfg: DistillTextRunConfig) -> DistillRun:
    """Read the teacher, the student's tokenizer and the data of ``cfg`` and return the run as it will
    train (module docstring); every problem is one :class:`ConfigError` line."""
    d, m = cfg.distill, cfg.model
    teacher = read_teacher(d)
    width = teacher.embed_dim
    if m.embed_dim and m.embed_dim != width:
        raise ConfigError(f"model.embed_dim={m.embed_dim}: the student projects into the teacher's embedding space, "
                          f"which is {width} wide; set model.embed_dim=0 (the teacher's) or {width}")

    # the student's tokenizer and tower
    if m.text_tower == "hf":
        tok_dir, key = Path(resolve_path(m.hf_text.path)) if m.hf_text.path else Path(""), "model.hf_text.path"
        if not m.hf_text.path or not (tok_dir / "config.json").is_file():
            raise ConfigError(f"model.hf_text.path={m.hf_text.path!r}: not a local transformers model folder "
                              "(config.json, weights, tokenizer files as save_pretrained writes them)")
        m = replace(m, hf_text=replace(m.hf_text, path=str(tok_dir)))
        tower_width = int(json.loads((tok_dir / "config.json").read_text(encoding="utf-8")).get("hidden_size", 0))
    else:
        tok_dir, key = Path(resolve_path(cfg.data.tokenizer)), "data.tokenizer"
        tower_width = m.text.embed_dim
    try:
        tokenizer = load_text_tokenizer(tok_dir)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"{key}={tok_dir}: {one_line(e)}") from None
    text = m.text
    if m.init_from_teacher:
        tc = teacher.clip
        same = getattr(teacher.tokenizer, "fingerprint", None) == tokenizer.fingerprint
        if tc is None or tc.cfg.text_tower != "gpt2" or not same:
            raise ConfigError(f"model.init_from_teacher: the teacher {d.teacher} is not our CLIP with our text tower "
                              f"on the student's tokenizer ({tok_dir}); set it false")
        text, tower_width = tc.cfg.text, tc.cfg.text.embed_dim
        note(f"model.text taken from the teacher {d.teacher} (model.init_from_teacher)")
    if not m.projection and tower_width != width:
        raise ConfigError(f"model.projection=false: the student tower is {tower_width} wide and the teacher's "
                          f"embedding {width}; without a projection they must be equal (or model.projection=true)")
    tokenizer.context_length = text.context_length
    m = replace(m, text=text_config_for(text, tokenizer), embed_dim=width)
    try:
        cfg = replace(cfg, model=m)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None

    # data
    langs = cfg.data.languages
    try:
        rows, dropped = read_pairs(cfg.data.source, langs, resolve_path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"data.source={cfg.data.source}: {one_line(e)}") from None
    train, val = split_pairs(rows, cfg.data.val_fraction, cfg.data.split_key, cfg.data.split_seed, langs[0])
    if len(train) < cfg.train.micro_batch_size:
        raise ConfigError(f"data.source={cfg.data.source}: {len(train)} training pairs with every language of "
                          f"{list(langs)} ({dropped} dropped), fewer than train.micro_batch_size="
                          f"{cfg.train.micro_batch_size}")
    if dropped:
        note(f"data.source: {dropped} of {len(rows) + dropped} pairs dropped (a language missing or empty)")
    targets = distinct_targets(train, langs[0])
    cache, ready = None, False
    if d.cache:
        cache = resolve_path(d.cache)
        try:
            ready = check_text_cache(cache, teacher, targets)
        except ValueError as e:
            raise ConfigError(f"distill.cache={d.cache}: {one_line(e)}") from None
    if teacher.clip is None:
        note(f"the teacher {d.teacher} has open_clip's own image tower, which our CLIP cannot hold: the run writes the "
             "student alone (text_student.pt + tokenizer/), to be used with the teacher's image tower")
    return DistillRun(cfg, teacher, tokenizer, tok_dir, width, train, val[:cfg.data.val_max], targets, cache, ready)
