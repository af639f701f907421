"""``--init``: the weights a CLIP run starts from, read and checked before any process work.

What a file may be, told apart by its format tag and its key layout (never by an error message):

* our MAE export (``mae_ckpt.pt`` or its safetensors folder): the image tower;
* a timm ViT state dict (``.safetensors``, ``.pt``, ``.pth``, ``.bin``; :mod:`clip.interop.timm_vit`):
  the image tower;
* a whole CLIP in OpenAI's layout (OpenAI, open_clip ``ViT-B-32``, KELIP;
  :mod:`clip.interop.openai_layout`): both towers (our own text tower only).

The file decides the shapes it brings (``model.vision``, or both towers' sizes), so a saved config
always matches the weights. :func:`load_image_tower` is the one hand-off of an image encoder into
CLIP's image tower (STYLE 9): decoder and mask-token entries dropped, every key and shape checked,
every difference reported in one line.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from clip.model.clip import CLIP, CLIPConfig
from mae.checkpoint import MAE_FORMAT, load_encoder_checkpoint
from mae.common.files import peek_format, read_state_dict
from mae.vit import ViTConfig, VisionTransformer

KINDS = ("an MAE encoder export (mae_ckpt.pt or its safetensors folder), a timm ViT state dict (.safetensors, "
         ".pt, .pth, .bin), or a CLIP checkpoint in OpenAI's / open_clip's layout")


@dataclass(frozen=True)
class InitWeights:
    """What an ``--init`` file holds: ``model`` (the run's model config with the shapes the file
    decides), the state dict under our names, and whether it fills the image tower or both."""

    target: Literal["visual", "clip"]
    model: CLIPConfig
    state: dict
    where: str
    what: str
    vision: ViTConfig | None = None  # the image tower's config as the file records it

    def load_into(self, model: CLIP) -> None:
        """Load the weights into ``model`` (built from :attr:`model`), checking every key and shape."""
        if self.target == "clip":
            check_state(model, self.state, self.where)
            model.load_state_dict(self.state, strict=True)
        else:
            load_image_tower(model.visual, self.vision, self.state, self.where, self.what)


def read_init(path: str | os.PathLike, model: CLIPConfig) -> InitWeights:
    """Read ``path`` for a run configured as ``model`` (module docstring); every problem is one
    ValueError or FileNotFoundError naming the file. Checked on the ``meta`` device: no memory."""
    from clip.interop.openai_layout import init_from_openai, is_openai_layout
    from clip.interop.timm_vit import load_timm_vit

    where = os.fspath(path)
    if not os.path.exists(where):
        raise FileNotFoundError(f"checkpoint not found: {where}")
    tag = peek_format(where)
    if tag == MAE_FORMAT:
        vision, state = load_encoder_checkpoint(where)
        init = InitWeights("visual", replace(model, vision=vision), state, where, "MAE encoder", vision)
    elif tag is not None:  # ours but not an encoder (a CLIP checkpoint), or someone else's tag
        load_encoder_checkpoint(where)  # raises the one-line reason
        raise AssertionError(tag)
    else:
        raw = read_state_dict(where)
        if is_openai_layout(raw):
            if model.text_tower == "hf":
                raise ValueError(f"{where} is a whole CLIP in OpenAI's layout: its text tower is ours, not "
                                 "model.text_tower=hf's encoder; initialise the image tower from a timm ViT instead")
            cfg, state = init_from_openai(model, raw, where)
            init = InitWeights("clip", cfg, state, where, "OpenAI-layout CLIP")
        else:
            vision, state = load_timm_vit(raw, model.vision.num_heads, where)
            init = InitWeights("visual", replace(model, vision=vision), state, where, "timm ViT", vision)
    with torch.device("meta"):
        init.load_into(CLIP(init.model, text_tower=torch.nn.Identity()) if init.target == "visual" else CLIP(init.model))
    return init


def load_image_tower(visual: VisionTransformer, saved_cfg: ViTConfig, state: dict[str, torch.Tensor],
                     where: str, what: str = "MAE encoder") -> None:
    """Load an encoder state dict into ``visual`` (a CLIP image tower) after checking everything.

    Decoder and mask-token entries, if present, are dropped. Every other key must exist in
    ``visual`` with the same shape, every visual key must be in ``state``, and ``saved_cfg`` must
    equal the tower's ``ViTConfig``; otherwise ONE ValueError (one line naming ``where``) lists
    every difference (``what`` names the kind of file). A tower on the ``meta`` device checks
    without loading.
    """
    problems = []
    want_cfg, got_cfg = asdict(visual.cfg), asdict(saved_cfg)
    for k in sorted(want_cfg):
        if got_cfg[k] != want_cfg[k]:
            problems.append(f"config.{k}: file {got_cfg[k]!r}, model {want_cfg[k]!r}")
    state = {k: v for k, v in state.items() if not (k.startswith("decoder") or k == "mask_token")}
    expected = visual.state_dict()
    problems += state_problems(expected, state)
    unexpected = sorted(set(state) - set(expected))
    if problems:
        hint = ""
        if unexpected and all(k.startswith("encoder.") for k in unexpected):
            hint = " (keys carry an 'encoder.' prefix: export the encoder's state dict, not the whole MAE model)"
        raise ValueError(f"{where}: {what} does not match the CLIP image tower{hint}; "
                         f"{len(problems)} difference(s): " + "; ".join(problems))
    if next(iter(expected.values())).device.type != "meta":
        visual.load_state_dict(state, strict=True)


def state_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading into a module whose state dict is ``expected``: missing and
    unexpected keys, and shapes that differ (each with its shapes)."""
    return ([f"missing key {k} (model shape {tuple(expected[k].shape)})" for k in sorted(set(expected) - set(state))]
            + [f"unexpected key {k} (file shape {tuple(state[k].shape)})" for k in sorted(set(state) - set(expected))]
            + [f"shape mismatch {k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
               for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape])


def check_state(model: CLIP, state: dict[str, torch.Tensor], where: str) -> None:
    """Every key of ``model`` present with the same shape and nothing else, or ONE ValueError listing
    the differences (a model on the ``meta`` device checks without memory)."""
    problems = state_problems(model.state_dict(), state)
    if problems:
        raise ValueError(f"{where}: does not fit the CLIP model; {len(problems)} difference(s): " + "; ".join(problems[:12]))
