"""Text-only distillation: a Korean text tower into a frozen English CLIP  ->  ``<out_dir>/clip_ckpt.pt``.

Run through the script ``launch/distill_text.py`` (``deepspeed launch/distill_text.py distill.teacher=RUN ...``).
M-CLIP (Carlsson et al. 2022) and Bingsu/clip-vit-base-patch32-ko: the teacher CLIP is frozen; a
student text tower (ours on our BPE, or a transformers encoder such as XLM-R) with a linear
projection into the teacher's embedding space learns, on parallel sentences only, to give every
translation of a sentence the teacher text tower's embedding of the English one
(:func:`clip.model.distill.text_distance`, MSE or cosine), and the English sentence itself the same, so
English is kept. The teacher's English embeddings can be computed once into ``distill.cache``.
The output is a whole CLIP: the teacher's image tower, projection and temperature with the student's
text tower and projection (:func:`clip.model.distill.assemble_clip`), with the student's ``tokenizer/``;
``clip.load``, ``python -m clip.eval`` and ``python -m clip.export`` take it as it is.
Read top to bottom, :func:`main` is config -> process group -> model -> data -> engine -> loop; the
configuration and what is decided before any process work are :mod:`launch.stages.distill_text_config`.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from clip.data.parallel import TextPairCollate, TextPairSource
from clip.interop.teacher_cache import read_text_cache, write_text_cache
from clip.model.checkpoint import save_clip
from clip.model.distill import TextStudent, assemble_clip, text_distance
from clip.model.hf_text import HFTextTower, tower_from_pretrained
from clip.model.text import TextTransformer
from launch.runtime.cli import open_run, parse_run_args, start_run
from launch.runtime.config import PROJECT_ROOT, ConfigError, dump_config
from launch.runtime.dist import Dist, barrier, set_seed
from launch.runtime.guard import Guard
from launch.runtime.loop import Step, Trainer
from launch.runtime.monitor import Monitor
from launch.runtime.optim import LRSchedule, param_groups
from launch.runtime.stream import BatchStream
from launch.stages.clip_config import keep_tokenizer
from launch.stages.distill_text_config import DistillRun, DistillTextRunConfig, resolve
from mae.common.files import register_format, save_checkpoint

STUDENT_FORMAT = register_format("enko-clip/text-student/v1", "a distilled text tower (text_student.pt)")


class DistillTextStep(Step):
    """One optimizer step: the student on every language of the batch, the distance of each to the
    teacher's embedding of the teacher-language sentence (read from the cache, else computed here).

    Args:
        engine: the student's engine (or the student itself: anything called with tokens (N, T)).
        teacher: the frozen teacher (used when ``cache`` is None).
        cache: (U, E) the teacher's embeddings of the distinct targets, or None.
        languages: the batch's languages, the teacher's first.
        loss: ``mse`` or ``cosine``; keep_teacher_language: whether its own term counts.
    """

    def __init__(self, engine, teacher, cache, languages, loss: str, keep_teacher_language: bool = True):
        super().__init__(engine)
        self.teacher, self.cache, self.languages, self.kind = teacher, cache, tuple(languages), loss
        self.first = 0 if keep_teacher_language else 1  # the student languages: all, or all but the teacher's

    def targets(self, batch: dict) -> torch.Tensor:
        """(B, E) the teacher's unit vectors of the batch's teacher-language sentences."""
        if self.cache is not None:
            return self.cache[batch["target"].to(self.cache.device)].to(batch["tokens"].device)
        return self.teacher.encode_text(batch["texts"][0]).to(batch["tokens"].device)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"][self.first:]  # (L', B, T)
        L, B, T = tokens.shape
        student = self.engine(tokens.reshape(L * B, T)).reshape(L, B, -1)  # (L', B, E)
        target = self.targets(batch)  # (B, E)
        distance = text_distance(student, target.expand(L, B, -1), self.kind)  # (L', B)
        cos = F.cosine_similarity(student.detach().float(), target.expand(L, B, -1), dim=-1).mean(dim=1)  # (L',)
        metrics = dict(zip((f"cos_{lang}" for lang in self.languages[self.first:]), cos))  # read after backward
        return distance.mean(), {**metrics, "count/skipped_samples": batch["n_skipped"]}


class Validator:
    """The held-out hook (rank 0): per student language, the mean cosine of the student's embedding
    of each held-out sentence to the teacher's embedding of its own English sentence, of another
    one's (the next row's: the level an aligned but uninformative student reaches), and the share of
    sentences whose own English embedding is the nearest among all held-out ones (R@1)."""

    def __init__(self, run: DistillRun, dist: Dist, student: torch.nn.Module, monitor: Monitor):
        self.run, self.dist, self.student, self.monitor = run, dist, student, monitor
        self.langs = run.cfg.data.languages
        self.target = run.teacher.encode_text([r[self.langs[0]] for r in run.val_rows]) if dist.is_main else None

    @torch.no_grad()
    def __call__(self, step: int):
        if not self.dist.is_main:
            return None
        res = heldout_cosines(self.student, self.run.tokenizer, self.run.val_rows, self.langs, self.target)
        self.monitor.log(step, {f"val/{k}": v for k, v in res.items()})
        keys = [f"val/cos_{lang}" for lang in self.langs] + [f"val/cos_{self.langs[1]}_other"]
        self.monitor.plot("val_cosine.png", keys, "held-out cosine to the teacher's English embedding", "cosine",
                          labels={k: k[4:] for k in keys})
        return None


@torch.no_grad()
def heldout_cosines(student, tokenizer, rows, languages, target: torch.Tensor, batch_size: int = 256) -> dict:
    """``{cos_<lang>, cos_<lang>_other, R@1_<lang>}`` of a student over held-out parallel rows against
    the teacher's unit vectors ``target`` (N, E) of their ``languages[0]`` sentences (:class:`Validator`)."""
    was = student.training
    student.eval()
    dev = next(student.parameters()).device
    out = {}
    try:
        for lang in languages:
            texts = [r[lang] for r in rows]
            emb = torch.cat([student(tokenizer.encode_batch(texts[s:s + batch_size]).to(dev)).float()
                             for s in range(0, len(texts), batch_size)])  # (N, E)
            emb = F.normalize(emb, dim=-1)
            t = target.to(dev)
            sim = emb @ t.T  # (N, N)
            out[f"cos_{lang}"] = float(sim.diagonal().mean())
            out[f"cos_{lang}_other"] = float(sim.roll(-1, dims=1).diagonal().mean())
            out[f"R@1_{lang}"] = float((sim.argmax(dim=1) == torch.arange(len(texts), device=dev)).float().mean())
    finally:
        student.train(was)
    return out


def build_student(run: DistillRun) -> TextStudent:
    """The student of the run's config; from the teacher's text tower with ``model.init_from_teacher``."""
    m = run.cfg.model
    if m.text_tower == "hf":
        tower = tower_from_pretrained(m.hf_text, m.text.pad_id)
        width = tower.embed_dim
    else:
        tower, width = TextTransformer(m.text), m.text.embed_dim
    student = TextStudent(tower, width, run.embed_dim, m.projection)
    if m.init_from_teacher:
        t = run.teacher.clip
        student.text.load_state_dict(t.text.state_dict())
        student.text_proj.load_state_dict(t.text_proj.state_dict())
    return student


def main(argv: list[str]) -> Path:
    # config: every check before any process work
    args, cfg = parse_run_args(argv, DistillTextRunConfig, __doc__.split("\n")[0],
                               str(PROJECT_ROOT / "configs" / "distill_text.yaml"))
    try:
        run = resolve(cfg)
    except ConfigError as e:
        if not args.print_config:
            raise
        print(dump_config(cfg), end="")
        print(f"note: printed without what the teacher and the tokenizer decide: {e}", file=sys.stderr)
        return Path(cfg.run.out_dir)
    cfg, out = run.cfg, Path(run.cfg.run.out_dir)
    start = start_run(cfg, args, {
        "tokenizer": (run.tokenizer.fingerprint, f"resume with the run's own tokenizer ({out / 'tokenizer'})"),
        "teacher": (run.teacher.fingerprint, "resume with the run's distill.teacher")})
    if start is None:
        return out
    dist = start.dist

    # model: the same initial weights on every rank; the teacher frozen beside it
    set_seed(cfg.train.seed)
    student = build_student(run)
    student.set_grad_checkpointing(cfg.train.grad_checkpointing)
    set_seed(cfg.train.seed + dist.rank)
    teacher = run.teacher.to(dist.device)

    # data: the teacher's embeddings of every target once (rank 0 writes the cache, the others read it)
    cache = None
    if run.cache is not None:
        if not run.cache_ready and dist.is_main:
            print(f"note: encoding {len(run.targets)} sentences with the teacher into {run.cache}", file=sys.stderr)
            write_text_cache(run.cache, teacher, run.targets, cfg.distill.teacher_batch_size)
        barrier(dist)
        cache = read_text_cache(run.cache, teacher, run.targets).to(dist.device)
    langs = cfg.data.languages
    dataset = TextPairSource(run.train_rows, langs, rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed)
    collate = TextPairCollate(run.tokenizer, cfg.model.text.context_length)
    stream = BatchStream(dataset, lambda epoch: torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.micro_batch_size, collate_fn=collate, num_workers=cfg.train.num_workers,
        generator=torch.Generator()), cfg.train.micro_batch_size, cfg.train.num_workers)

    # engine
    groups, specs = param_groups(student, cfg.train.weight_decay)
    schedule = LRSchedule(cfg.train, dist.world_size, specs)
    engine, monitor = open_run(cfg, start, student, groups, schedule)
    if dist.is_main:
        keep_tokenizer(run.tokenizer, run.tokenizer_dir, out)

    # loop
    step = DistillTextStep(engine, teacher, cache, langs, cfg.distill.loss, cfg.distill.keep_teacher_language)
    trainer = Trainer(cfg, dist, engine, stream, step, monitor, schedule, guard=Guard(cfg.guard), identity=start.identity)
    if start.resume:
        trainer.resume()
    validator = Validator(run, dist, engine.module, monitor) if run.val_rows else None
    trainer.fit([(cfg.val_every, validator)] if validator is not None else [])
    trainer.save()
    if dist.is_main:
        what = save_output(run, engine.module, out)
        if trainer.ema is not None:  # beside the trained weights
            with trainer.ema.swapped():
                what += ", " + save_output(run, engine.module, out, "_ema")
        monitor.plot("loss.png", ["train/loss"], "text distillation loss", f"{cfg.distill.loss} to the teacher",
                     labels={"train/loss": "train"})
        monitor.finish(f"distillation done: {cfg.train.steps} steps", trainer.skip_totals(), f"{what}, tokenizer/, loss.png")
    barrier(dist)
    return out


def save_output(run: DistillRun, student: TextStudent, out: Path, suffix: str = "") -> str:
    """``clip_ckpt{suffix}.pt``: the teacher's image side with the student's text side; or, for a
    teacher our CLIP cannot hold, ``text_student{suffix}.pt`` (the student's weights and config).
    Returns the file's name."""
    m, langs, fp = run.cfg.model, list(run.cfg.data.languages), run.tokenizer.fingerprint
    if run.teacher.clip is None:
        config = {"text_tower": m.text_tower, "text": asdict(m.text), "hf_text": asdict(m.hf_text),
                  "projection": m.projection, "embed_dim": run.embed_dim, "teacher": run.cfg.distill.teacher}
        extra = {"tokenizer": fp, "languages": langs}
        if isinstance(student.text, HFTextTower):
            extra["hf_text_config"] = student.text.config_json()
        save_checkpoint(out / f"text_student{suffix}.pt", STUDENT_FORMAT, config, student.state_dict(), extra=extra)
        return f"text_student{suffix}.pt"
    t = run.teacher.clip
    cfg = replace(t.cfg, text=m.text, text_tower=m.text_tower, hf_text=m.hf_text)
    save_clip(assemble_clip(t, student, cfg), out / f"clip_ckpt{suffix}.pt", tokenizer=fp, languages=langs)
    return f"clip_ckpt{suffix}.pt"
