"""Shared fixtures: paths to the bundled data, the optional full data set, a tiny tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
SHARED_DATA_DIR = Path(os.environ.get("ENKO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The full real data set beside the checkout; tests that need it skip when it is absent."""
    if not (SHARED_DATA_DIR / "README.md").is_file():
        pytest.skip(f"full data set not found at {SHARED_DATA_DIR}")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 2,000-token bilingual BPE trained once per session on the bundled corpus slice."""
    from tokenizer.train import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(
        [str(DATA_DIR / "corpus" / "en.txt"), str(DATA_DIR / "corpus" / "ko.txt")],
        str(out),
        vocab_size=2000,
        max_lines_per_file=8000,
        seed=0,
    )
    return out


@pytest.fixture
def free_port() -> int:
    """A free TCP port on localhost for a launcher's rendezvous."""
    from launch.runtime.dist import free_port as find

    return find()


@pytest.fixture(scope="session")
def make_tiny_clip_run(tiny_tokenizer_dir):
    """``make(folder, patch_size=32, embed_dim=32, fingerprint=True, **save_kw) -> folder``: a run
    folder holding the tiny tokenizer and a random CLIP (64 px images, one block per tower, width
    32, context length 32: not the tokenizer's default 77), seeded, saved with ``clip.model.save_clip``."""
    import shutil

    import torch

    from clip.model import CLIP, CLIPConfig, save_clip
    from clip.model.text import TextConfig
    from mae.vit import ViTConfig
    from tokenizer import BilingualTokenizer

    def make(folder: Path, patch_size: int = 32, embed_dim: int = 32, fingerprint: bool = True, **save_kw) -> Path:
        shutil.copytree(tiny_tokenizer_dir, folder / "tokenizer")
        tok = BilingualTokenizer.from_dir(folder / "tokenizer")
        torch.manual_seed(0)
        cfg = CLIPConfig(vision=ViTConfig(img_size=64, patch_size=patch_size, embed_dim=32, depth=1, num_heads=2),
                         text=TextConfig(vocab_size=tok.vocab_size, context_length=32, embed_dim=32, depth=1,
                                         num_heads=2, eot_id=tok.eot_id, pad_id=tok.pad_id), embed_dim=embed_dim)
        save_clip(CLIP(cfg), folder / "clip_ckpt.pt", tokenizer=tok.fingerprint if fingerprint else None, **save_kw)
        return folder

    return make
