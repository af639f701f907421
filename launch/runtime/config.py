"""Run configuration: frozen dataclasses filled from a YAML file, then from ``key=value`` overrides.

Each stage has one schema (``launch.stages.mae.MAERunConfig``, ``launch.stages.clip_config.CLIPRunConfig``)
built from the sub-configs here and the models' own configs. Order of precedence: dataclass
defaults < YAML file < command-line overrides (dotted keys, values parsed as YAML scalars, e.g.
``train.steps=20 model.encoder.depth=2 data.source=shards/{000000..000009}.tar``). The schemas
are built by :func:`mae.common.configs.build`: unknown keys, values of the wrong type and every
schema's own range checks are a :class:`ConfigError` naming the key and where the value came
from; the entry points print it as one line and exit 2. The resolved config is saved in the run
folder (:mod:`launch.runtime.run_dir`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml

from mae.common.configs import ConfigError, build, to_dict

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[2]


Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class EMAConfig:
    """An exponential moving average of the weights (timm's ``ModelEmaV3``, open_clip's EMA):
    ``ema = decay * ema + (1 - decay) * weights`` every ``every`` optimizer steps from ``start_step``
    (a copy of the weights before it). ``decay: 0`` turns it off."""

    decay: float = 0.0
    start_step: int = 0
    every: int = 1

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) (0 = off), got {self.decay}")
        if self.start_step < 0 or self.every < 1:
            raise ValueError(f"start_step must be >= 0 and every >= 1, got {self.start_step} and {self.every}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run-length settings shared by both stages.

    ``lr`` is the absolute peak learning rate; when it is null it is derived as
    ``base_lr * global_batch / 256`` (the MAE paper's rule). ``precision`` is fp32, bf16 or fp16
    (autocast over fp32 weights; fp16 with dynamic loss scaling: ``fp16_initial_scale_power``,
    doubled every ``fp16_loss_scale_window`` steps without overflow); ``launch.runtime.optim.PRECISIONS``
    says what each means.
    """

    steps: int = 100
    micro_batch_size: int = 16  # per rank, per micro step
    grad_accum: int = 1
    lr: Optional[float] = None
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off
    precision: Precision = "fp32"
    zero_stage: Literal[0, 1, 2] = 0
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    seed: int = 0
    num_workers: int = 1
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    compile: bool = False  # torch.compile the model (nn.Module.compile: state dict keys unchanged)
    compile_backend: str = "inductor"
    layer_decay: float = 1.0  # layer-wise lr decay of the towers (launch.runtime.optim.layer_decay); 1 = off
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("base_lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 (or null for base_lr x batch / 256), got {self.lr}")
        for name in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how often it reports."""

    out_dir: str = "runs/run"
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # DeepSpeed checkpoints kept; older tags are deleted
    peak_tflops: float = 0.0  # the device's peak for train/mfu; 0 = known GPU table / measured CPU GEMM rate
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; offline unless WANDB_MODE=online)

    def __post_init__(self):
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        for name in ("ckpt_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class StreamConfig:
    """How a stage reads its source (the ``data.`` keys both stages share; ``mae.images.stream``).

    ``resampled``: draw shards with replacement per DataLoader worker, endlessly (open_clip's
    ``--dataset-resampled``); the epoch is then nominal. ``num_samples``: samples per (nominal)
    epoch, for epoch-based settings; 0 = from the shards' statistics (our ``stats.json``,
    img2dataset's ``*_stats.json``), needed for remote shards. ``source_weights``: one per
    ``::``-separated source of ``data.source``, per-shard sampling weights when resampling.
    ``shuffle_buffer``: samples in each worker's shuffle buffer over shards. ``curation``: the
    output folder of ``python -m clip.curate`` for this source: each sample is kept with its
    probability there, drawn afresh every epoch (:mod:`mae.images.keep`); "" = every sample.
    """

    resampled: bool = False
    num_samples: int = 0
    source_weights: tuple[float, ...] = ()
    shuffle_buffer: int = 256
    curation: str = ""

    def __post_init__(self):
        if self.num_samples < 0 or self.shuffle_buffer < 0 or any(w <= 0 for w in self.source_weights):
            raise ValueError("num_samples and shuffle_buffer must be >= 0 and source_weights > 0")

    def stream_options(self) -> dict:
        """Keyword arguments for ``mae.images.stream.ImageDataset`` / ``clip.data.pairs.PairDataset``."""
        return {"resampled": self.resampled, "num_samples": self.num_samples, "weights": self.source_weights,
                "shuffle_buffer": self.shuffle_buffer, "curation": resolve_path(self.curation) if self.curation else ""}


@dataclass(frozen=True)
class GuardConfig:
    """When training stops as diverged (checked at every log, before that step's checkpoint, so the
    last checkpoint is from before; a non-finite loss stops at once). 0 turns a check off.

    ``loss_spike``: the interval's mean loss exceeds this many times the median of the previous
    ``window`` logged losses (from the second log on). ``chance_logs``: (CLIP) the loss stays within
    0.2 % of the chance level (where equal logits put it) for this many logs in a row after warmup and the freeze windows.
    ``max_temperature``: (CLIP) the learned temperature 1 / logit_scale rises above this.
    """

    loss_spike: float = 10.0
    window: int = 10
    chance_logs: int = 5
    max_temperature: float = 1.0

    def __post_init__(self):
        for name in ("loss_spike", "window", "chance_logs", "max_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def resolve_path(path: str) -> str:
    """A relative data path is taken from the working directory, else from the project root.

    So the bundled ``data/...`` paths in ``configs/`` work from any directory.
    """
    p = Path(path).expanduser()
    if p.is_absolute() or "{" in path or p.exists():
        return str(p)
    rooted = PROJECT_ROOT / p
    return str(rooted) if rooted.exists() else str(p)


# --------------------------------------------------------------------------- loading


def load_config(schema: type[T], path: Optional[str] = None, overrides: Optional[list[str]] = None) -> T:
    """Build ``schema`` from defaults, then the YAML file at ``path``, then ``overrides``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded
        source = str(path)
    base = build(schema, data, source)  # errors in the file name the file
    if not overrides:
        return base
    data = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return build(schema, data, "command line", base)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def dump_config(cfg: Any) -> str:
    """The config as YAML, in field order (what ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def check_source(source, key: str, stream: Optional[StreamConfig] = None):
    """The data source resolved (``mae.images.sources.resolve_source``), or one line naming ``key``: missing,
    empty, a bad manifest line, (for files) none of its first images on disk, or ``stream``
    settings the source cannot take (resampling and weights need shards, one weight per ``::`` source)."""
    from mae.images.sources import resolve_source  # lazily: a config loads without the image stack
    from mae.images.stream import check_stream

    try:
        kind, items = resolve_source(source)
        if stream is not None:
            check_stream(kind, source, stream.resampled, stream.source_weights)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if stream is not None and stream.curation:
        from mae.images.keep import CurationKeep

        try:
            CurationKeep(resolve_path(stream.curation))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    if kind == "records" and items:
        head = items[:1000]
        if not any(os.path.isfile(r["path"]) for r in head):
            raise ConfigError(f"{key}: none of the first {len(head)} images exists (e.g. {head[0]['path']})")
    return kind, items
