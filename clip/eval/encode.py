"""Encoding for evaluation: images, texts, caption galleries and zero-shot classifiers.

Every function runs the model in eval mode without autograd and restores its train/eval mode
after, so the trainer can call it mid-run. Embeddings come back L2-normalised, float32, on the
CPU, whatever the model's device and parameter dtype.

Legend: N images, M texts, C classes, T templates, E embedding width.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip.data.pairs import extract_captions
from mae.images.decode import load_rgb
from mae.images.transforms import eval_transform


def eval_view(cfg):
    """The evaluation view of a model's images (a ``CLIPConfig``: its image size and the pixel
    normalisation it was trained with): shorter side to the size, centre crop, normalised."""
    return eval_transform(cfg.vision.img_size, cfg.image_mean, cfg.image_std)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode and inference mode for the block; the model's previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _context_length(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(getattr(cfg, "text", None), "context_length", None)


def encode_texts(model, tokenizer, texts: Sequence[str], device="cpu", batch_size: int = 256,
                 progress: bool = False) -> torch.Tensor:
    """(M, E) text embeddings, encoded in batches of ``batch_size``."""
    ctx, out = _context_length(model), []
    with eval_mode(model):
        for s in tqdm(range(0, len(texts), batch_size), desc="texts", file=sys.stderr, disable=not progress):
            tokens = tokenizer.encode_batch(list(texts[s : s + batch_size]), context_length=ctx)  # (B, T)
            out.append(F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def zeroshot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                        device="cpu", batch_size: int = 256) -> torch.Tensor:
    """(C, E) class embeddings by prompt ensembling: every template filled with the class name,
    the L2-normalised prompt embeddings averaged, the mean renormalised (CLIP, Radford et al. 2021)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every prompt template needs a '{{}}' placeholder: {list(templates)}")
    texts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, texts, device, batch_size)
    emb = emb.view(len(classnames), len(templates), -1)  # (C, T, E)
    return F.normalize(emb.mean(dim=1), dim=-1)


class _SampleImages(torch.utils.data.Dataset):
    """Samples as a dataset: (index, image tensor or None, error). A sample carries a ready
    ``image`` tensor, or a ``path`` / ``file`` (relative to ``root``) loaded and transformed here."""

    def __init__(self, samples: Sequence[Mapping], transform, root):
        self.samples, self.transform, self.root = samples, transform, Path(root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        if isinstance(s.get("image"), torch.Tensor):
            return i, s["image"], None
        try:
            return i, self.transform(load_rgb(s.get("path") or str(self.root / s["file"]))), None
        except Exception as e:  # an undecodable or missing image is skipped and counted
            return i, None, f"{s.get('file')}: {type(e).__name__}: {e}".replace("\n", " ")


def _collate(batch):
    kept = [(i, x) for i, x, _ in batch if x is not None]
    errors = [e for _, x, e in batch if x is None]
    images = torch.stack([x for _, x in kept]) if kept else None  # (B, 3, H, W)
    return [i for i, _ in kept], images, errors


def _chunks(samples: Iterable[Mapping], size: int):
    """(up to ``size`` samples, the sum of their ``n_skipped``) of a sample stream."""
    buf, skipped = [], 0
    for s in samples:
        skipped += int(s.get("n_skipped", 0))
        buf.append(s)
        if len(buf) == size:
            yield buf, skipped
            buf, skipped = [], 0
    if buf or skipped:
        yield buf, skipped


def _image_batches(samples, transform, root, batch_size, workers):
    """Yield (kept samples, images (B, 3, H, W) or None, n_skipped, errors)."""
    if isinstance(samples, Sequence):
        loader = torch.utils.data.DataLoader(_SampleImages(samples, transform, root), batch_size=batch_size,
                                             num_workers=workers, collate_fn=_collate)
        for idx, images, errors in loader:
            yield [samples[i] for i in idx], images, len(errors), errors
        return
    for buf, skipped in _chunks(samples, batch_size):  # e.g. a clip.data.pairs.PairDataset
        idx, images, errors = _collate([_SampleImages(buf, transform, root)[i] for i in range(len(buf))])
        yield [buf[i] for i in idx], images, skipped + len(errors), errors


def encode_images(model, samples, device="cpu", transform=None, root=".", batch_size: int = 64,
                  workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, list[dict], int]:
    """Encode images in batches, skipping (and counting) undecodable ones.

    Args:
        samples: a list of dicts with ``path`` (as from mae.images.sources.iter_manifest) or ``file``
            (relative to ``root``), loaded with mae.images.decode.load_rgb and ``transform``
            (default: the model's :func:`eval_view`), or with a ready ``image`` (3, H, W) tensor; or
            any iterable of such dicts (e.g. a ``clip.data.pairs.PairDataset``, whose ``n_skipped``
            counts are added up).
        workers: DataLoader workers decoding images (a list of samples only).
    Returns:
        (embeddings (N, E), the N kept samples without their ``image``, n_skipped).
    """
    if transform is None and hasattr(model, "cfg"):
        transform = eval_view(model.cfg)
    embs, kept, n_skipped, shown = [], [], 0, 0
    total = len(samples) if isinstance(samples, Sequence) else None
    bar = tqdm(total=total, desc="images", file=sys.stderr, disable=not progress)
    with eval_mode(model):
        for batch, images, skipped, errors in _image_batches(samples, transform, root, batch_size, workers):
            for e in errors[: max(0, 5 - shown)]:
                print(f"clip.eval: skipped image {e}", file=sys.stderr)
            shown += len(errors)
            n_skipped += skipped
            bar.update(len(batch) + len(errors))
            if images is None:
                continue
            images = images.to(device, next(model.parameters(), images).dtype)  # e.g. a bf16 model
            embs.append(F.normalize(model.encode_image(images).float(), dim=-1).cpu())
            kept.extend({k: v for k, v in s.items() if k != "image"} for s in batch)
    bar.close()
    if shown > 5:
        print(f"clip.eval: ... {shown} images skipped in all", file=sys.stderr)
    return (torch.cat(embs) if embs else torch.zeros(0, 0)), kept, n_skipped


def captions_of(sample: Mapping, lang: str) -> list[str]:
    """Captions of one language, read as training reads them (``clip.data.pairs.extract_captions``:
    ``sample["captions"][lang]`` or ``sample[lang]``, list or str, empty ones dropped)."""
    return extract_captions(sample, [lang])[0].get(lang, [])


def encode_language_captions(model, tokenizer, samples: Sequence[Mapping], languages: Sequence[str],
                             device="cpu", batch_size: int = 256,
                             progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every caption of every sample, per language: ``{lang: (embeddings (M, E), image index (M,))}``,
    captions in sample order (so each image's first caption comes first); languages with no
    caption are absent."""
    out = {}
    for lang in languages:
        texts, text_image = [], []
        for j, s in enumerate(samples):
            for c in captions_of(s, lang):
                texts.append(c)
                text_image.append(j)
        if texts:
            emb = encode_texts(model, tokenizer, texts, device, batch_size, progress)
            out[lang] = emb, torch.tensor(text_image)
    return out
