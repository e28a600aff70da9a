"""Shared fixtures: tiny random models of every supported family, imported like real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

import torch

from actsparse.models import TINY_FAMILIES, import_model

REPO = Path(__file__).resolve().parent.parent
FAMILIES = tuple(TINY_FAMILIES)

# Tiny models run fastest on one thread; a thread pool only adds contention on small CPUs.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: the imported safetensors directory of a tiny model of one family (cached per session)."""
    cache: dict[str, Path] = {}

    def make(family: str = "llama") -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"model-{family}") / family
            import_model({"tiny": {"family": family, "seed": 0}}, out)
            cache[family] = out
        return cache[family]

    return make


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared machine thread contention
    multiplies their run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
