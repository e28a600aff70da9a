"""Shared fixtures: tiny random models of every supported family, imported like real ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import torch

from actsparse.models import TINY_FAMILIES, import_model

REPO = Path(__file__).resolve().parent.parent
FAMILIES = tuple(TINY_FAMILIES)

# Tiny models run fastest on one thread; a thread pool only adds contention on small CPUs.
torch.set_num_threads(1)


def bench_module(name: str) -> ModuleType:
    """The script ``bench/{name}.py`` as a module (loaded once), for tests of a benchmark's checks."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


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
