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
    from launch.dist import free_port as find

    return find()
