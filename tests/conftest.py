"""Shared fixtures: offline hub, a tiny local model, and the optional ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NEGKD_PLAIN_PROGRESS", "1")
# tiny models on a shared 2-core box: one thread is far faster than two threads spinning
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random LLaMA model + tokenizer directory (built once per test session)."""
    from negkd.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: a user's clone has no ../shared."""
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip("../shared/data is absent (only present on the developers' machines)")
    return d


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core box: one thread is ~50x faster than two spinning.
    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    if any(item.get_closest_marker("gpu") for item in items) and not has_cuda():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip_gpu)
