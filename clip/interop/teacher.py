"""A frozen teacher CLIP for distillation (M-CLIP's text-only recipe; open_clip's ``--distill-model``).

:func:`load_teacher` reads a CLIP from local files only, one of

* our own model: a run folder (``clip_ckpt.pt`` + ``tokenizer/``), ``clip_ckpt.pt``, or a safetensors
  export folder (:func:`clip.model.checkpoint.load_clip_and_tokenizer`);
* an open_clip ``local-dir:`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors`` and
  its tokenizer; our ``python -m clip.export --format open_clip`` writes one), run by open_clip itself;
* OpenAI-layout weights (OpenAI CLIP, open_clip ``ViT-B-32``, KELIP: :mod:`clip.interop.openai_layout`)
  with a tokenizer folder (``tokenizer=``): ours, or a transformers one, whose EOT / PAD ids the text
  tower pools at; the activation is not in the weights (``act_layer``, QuickGELU for OpenAI's and KELIP's).

The :class:`Teacher` reads its own captions with its own tokenizer (it may differ from the student's)
and returns L2-normalised features under ``no_grad``; :attr:`Teacher.clip` is the same model as our
:class:`clip.model.CLIP` where it can be one (always for our models and OpenAI-layout weights; for an
open_clip folder when its image tower is open_clip's native ViT or a timm ViT, e.g. our own export),
which a distilled model takes its image tower from. Anything that is not a CLIP is one ValueError line.

Legend: N images or texts, E the teacher's embedding width.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from clip.model.clip import CLIP

OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
KINDS = ("our CLIP (run folder, clip_ckpt.pt or safetensors export), an open_clip local-dir folder "
         "(open_clip_config.json + open_clip_model.safetensors), or OpenAI-layout CLIP weights with a tokenizer folder")


class Teacher:
    """A frozen CLIP that encodes raw captions and finished images.

    Args:
        model: the network: our :class:`CLIP`, or an open_clip model (``kind == "open_clip"``).
        tokenizer: texts -> (N, T) ids (ours / :class:`clip.model.tokens.HFTokenizer`, or open_clip's).
        kind: ``enko`` (ours), ``openai`` (OpenAI-layout weights) or ``open_clip``.
        image_size, image_mean, image_std: the pixels the image tower was trained on.
        clip: the model as our :class:`CLIP` (``model`` itself unless open_clip; for open_clip a copy
            on the CPU, for the distilled model's image side), or None.
        where: the path it was read from (for messages).
        tokenizer_id: what identifies the tokenizer in :attr:`fingerprint`.

    ``languages``: the caption languages it was trained on, where its checkpoint says (ours), else
    None (unknown): what :class:`clip.model.distill.DistillTerm` should let it judge.
    """

    def __init__(self, model, tokenizer, kind: str, image_size: int, image_mean, image_std,
                 clip: Optional[CLIP], where: str, tokenizer_id: str):
        self.model, self.tokenizer, self.kind, self.clip, self.where = model.eval(), tokenizer, kind, clip, where
        self.image_size, self.image_mean, self.image_std = int(image_size), tuple(image_mean), tuple(image_std)
        self._tokenizer_id = tokenizer_id
        self._fingerprint: Optional[str] = None
        self.languages: Optional[list[str]] = getattr(clip, "trained_languages", None) if kind == "enko" else None
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "Teacher":
        self.model.to(device)
        return self

    @property
    def embed_dim(self) -> int:
        """E, the width of the joint embedding space."""
        if isinstance(self.model, CLIP):
            return self.model.cfg.embed_dim
        return int(self.encode_text(["a"]).shape[-1])

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the teacher (capped as the model caps it)."""
        scale = self.model.scale() if isinstance(self.model, CLIP) else self.model.logit_scale.exp()
        return float(scale.detach().reshape(-1)[0])

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of a hash over the weights (names, shapes, bytes) and the tokenizer:
        what a cache of its embeddings is keyed by."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.kind}|{self._tokenizer_id}".encode())
            for name, t in sorted(self.model.state_dict().items()):
                t = t.detach().to("cpu").contiguous()
                h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, E) float32 unit vectors of ``texts``, tokenized by the teacher's own tokenizer."""
        out = []
        for s in range(0, len(texts), batch_size):
            chunk = list(texts[s:s + batch_size])
            if isinstance(self.model, CLIP):
                ids = self.tokenizer.encode_batch(chunk, context_length=self.model.cfg.text.context_length)
            else:
                ids = self.tokenizer(chunk)
            out.append(F.normalize(self.model.encode_text(ids.to(self.device)).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 0, device=self.device)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
        """(N, E) float32 unit vectors of images (N, 3, H, W) normalised with ``mean`` / ``std``
        (default: the teacher's own): re-normalised to the teacher's and resized (bicubic,
        antialiased) to its image size where they differ."""
        x = images.float().to(self.device)
        if mean is not None and (tuple(mean) != self.image_mean or tuple(std) != self.image_std):
            m, s = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
            tm, ts = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.image_mean, self.image_std))
            x = (x * s + m - tm) / ts  # (N, 3, H, W) in the teacher's normalisation
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


def load_teacher(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 act_layer: str = "quick_gelu", device="cpu") -> Teacher:
    """The teacher CLIP at ``path`` (module docstring). ``tokenizer``: a tokenizer folder, needed for
    OpenAI-layout weights (else the model's own); ``act_layer``: those weights' activation.
    FileNotFoundError or ValueError, one line naming the path."""
    where = os.fspath(path)
    p = Path(where)
    if not p.exists():
        raise FileNotFoundError(f"teacher not found: {where}")
    if p.is_dir() and all((p / f).is_file() for f in OPEN_CLIP_FILES):
        teacher = _open_clip_teacher(p)
    elif _is_ours(p):
        teacher = _our_teacher(p, tokenizer)
    else:
        teacher = _openai_teacher(p, tokenizer, act_layer)
    return teacher.to(device)


def _is_ours(p: Path) -> bool:
    from clip.model.checkpoint import CKPT_FILE, CLIP_FORMAT
    from mae.common.files import peek_format

    if p.is_dir():
        return (p / CKPT_FILE).is_file() or peek_format(p) is not None
    return peek_format(p) == CLIP_FORMAT or (p.suffix == ".safetensors" and peek_format(p) is not None)


def _our_teacher(p: Path, tokenizer) -> Teacher:
    from clip.model.checkpoint import load_clip_and_tokenizer

    try:
        model, tok = load_clip_and_tokenizer(p, tokenizer)
    except ValueError as e:
        raise ValueError(f"{p} is not a CLIP teacher: {' '.join(str(e).split())}") from None
    except FileNotFoundError as e:  # no tokenizer/ beside the weights
        raise ValueError(f"{p}: {' '.join(str(e).split()).removesuffix(' (pass --tokenizer DIR)')}; name the "
                         "teacher's tokenizer folder (distill.teacher_tokenizer)") from None
    c = model.cfg
    return Teacher(model, tok, "enko", c.vision.img_size, c.image_mean, c.image_std, model, str(p), tok.fingerprint)


def _openai_teacher(p: Path, tokenizer, act_layer: str) -> Teacher:
    from clip.interop.openai_layout import config_from_state, from_openai_layout, is_openai_layout
    from clip.model.text import TextConfig
    from clip.model.tokens import load_text_tokenizer
    from mae.common.files import read_state_dict

    if p.is_dir():
        raise ValueError(f"{p} is not a CLIP teacher: a folder without clip_ckpt.pt, config.json + model.safetensors "
                         f"or {' + '.join(OPEN_CLIP_FILES)} (a teacher is {KINDS})")
    try:
        raw = read_state_dict(p)
    except ValueError as e:
        raise ValueError(f"{p} is not a CLIP teacher: {' '.join(str(e).split())}") from None
    if not is_openai_layout(raw):
        raise ValueError(f"{p} is not a CLIP teacher: its weights are not in OpenAI CLIP's layout (keys start "
                         f"{sorted(raw)[:3]}; a teacher is {KINDS})")
    if not tokenizer:
        raise ValueError(f"{p}: OpenAI-layout weights carry no tokenizer; name the folder of the one they were "
                         "trained with (distill.teacher_tokenizer)")
    tok = load_text_tokenizer(tokenizer)
    text = TextConfig(eot_id=tok.eot_id, pad_id=tok.pad_id)
    cfg = config_from_state(raw, act_layer, text, where=str(p))
    if cfg.text.vocab_size != tok.vocab_size:
        raise ValueError(f"{p}: token_embedding has {cfg.text.vocab_size} rows but the tokenizer {tokenizer} has "
                         f"{tok.vocab_size} tokens: not the teacher's tokenizer")
    tok.context_length = cfg.text.context_length
    model = CLIP(cfg)
    model.load_state_dict(from_openai_layout(raw, str(p)), strict=True)
    return Teacher(model, tok, "openai", cfg.vision.img_size, cfg.image_mean, cfg.image_std, model, str(p),
                   tok.fingerprint)


def _open_clip_teacher(p: Path) -> Teacher:
    try:
        import open_clip
    except ImportError:
        raise ValueError(f"{p} is an open_clip folder: pip install open_clip_torch to use it as a teacher") from None
    conf = json.loads((p / OPEN_CLIP_FILES[0]).read_text(encoding="utf-8"))
    try:
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{p.resolve()}")
        tok = open_clip.get_tokenizer(f"local-dir:{p.resolve()}")
    except Exception as e:  # open_clip raises many types for a folder it cannot build
        raise ValueError(f"{p} is not a CLIP teacher open_clip can load: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    pre = conf.get("preprocess_cfg", {})
    size = getattr(model.visual, "image_size", None) or conf["model_cfg"]["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = pre.get("mean") or getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = pre.get("std") or getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    tok_id = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(p.glob("tokenizer*.json")))).hexdigest()[:16]
    return Teacher(model, tok, "open_clip", size, mean, std, _ours_from_open_clip(p, conf), str(p),
                   tok_id)


def _ours_from_open_clip(p: Path, conf: dict) -> Optional[CLIP]:
    """The open_clip folder's model as our :class:`CLIP` when both towers have our architecture (a
    timm ViT with a linear projection or open_clip's native ViT; open_clip's own text transformer: an
    export of ours always has), else None. The native ViT's patch embedding has no bias (an export of
    ours folded it into the positions): ours is set to zero."""
    from safetensors.torch import load_file

    from clip.interop.export import TIMM_SIZES
    from clip.interop.openai_layout import config_from_state, from_openai_layout, is_openai_layout
    from clip.interop.timm_vit import load_timm_vit
    from clip.model.text import TextConfig

    mc, pre = conf["model_cfg"], conf.get("preprocess_cfg", {})
    vc, tc = mc.get("vision_cfg", {}), mc.get("text_cfg", {})
    timm_name = vc.get("timm_model_name")
    if tc.get("hf_model_name") or (timm_name and vc.get("timm_proj") != "linear"):
        return None
    try:
        state = load_file(str(p / OPEN_CLIP_FILES[1]))
        act = "quick_gelu" if mc.get("quick_gelu") else "gelu"
        vocab = state["token_embedding.weight"].shape[0]
        eot = int(tc.get("eos_id", vocab - 1))  # open_clip's default pools at the argmax id, the last
        text = TextConfig(eot_id=eot, pad_id=int(tc.get("pad_id", 0)))
        if timm_name:  # our ViT has timm's names: the trunk loads as it is
            heads = next(h for (_, _, h), size in TIMM_SIZES.items() if f"vit_{size}_" in timm_name)
            vision, visual = load_timm_vit({k[len("visual.trunk."):]: v for k, v in state.items()
                                            if k.startswith("visual.trunk.")}, heads, str(p))
            proj = state["visual.head.proj.weight"]  # (E, Dv)
            # the text side in OpenAI's layout, with stand-ins of the right shapes for the image keys it reads
            stand_in = {k: v for k, v in state.items() if not k.startswith("visual.")}
            grid = vision.img_size // vision.patch_size
            P, D = vision.patch_size, vision.embed_dim
            stand_in.update({"visual.conv1.weight": torch.empty(D, 3, P, P),
                             "visual.class_embedding": torch.empty(D),
                             "visual.positional_embedding": torch.empty(grid * grid + 1, D),
                             "visual.proj": proj.t(),
                             "visual.transformer.resblocks.0.mlp.c_fc.weight": torch.empty(1, D)})
            cfg = config_from_state(stand_in, act, text, where=str(p))
            cfg = replace(cfg, vision=replace(vision, act_layer=act),
                          vision_pool="avg" if vc.get("timm_pool") == "avg" else "token")
            ours = {**{f"visual.{k}": v for k, v in visual.items()}, "visual_proj.weight": proj,
                    **from_openai_layout({k: v for k, v in state.items() if not k.startswith("visual.")}, str(p))}
        else:
            if not is_openai_layout(state):
                return None
            cfg = config_from_state(state, act, text, where=str(p))
            v = cfg.vision
            cfg = replace(cfg, vision=replace(v, pre_norm=not vc.get("no_ln_pre", False),
                                              norm_eps=vc.get("norm_kwargs", {}).get("eps", 1e-5),
                                              num_heads=v.embed_dim // vc.get("head_width", 64)),
                          vision_pool="avg" if vc.get("pool_type") == "avg" else "token")
            ours = from_openai_layout(state, str(p))
            if not cfg.vision.pre_norm:
                ours["visual.patch_embed.proj.bias"] = torch.zeros(v.embed_dim)
        cfg = replace(cfg, text=replace(cfg.text, num_heads=int(tc.get("heads", cfg.text.num_heads)),
                                        norm_eps=tc.get("norm_kwargs", {}).get("eps", 1e-5)),
                      image_mean=tuple(pre.get("mean", cfg.image_mean)), image_std=tuple(pre.get("std", cfg.image_std)))
        model = CLIP(cfg)
        model.load_state_dict(ours, strict=True)
        return model.eval()
    except (ValueError, KeyError, RuntimeError, StopIteration):  # not our architecture after all
        return None
