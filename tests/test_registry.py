"""The method registry is what the rest of the code does: its decode skips are the projections the
kernels replace, and it stays importable without torch (the workflow reads it at every parse)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from actsparse.anatomy import anatomy_of
from actsparse.hooks import _channels
from actsparse.kernels import SparseGatedMLP, sparsify_for_decode
from actsparse.models import tiny_model
from actsparse.registry import METHODS, configured, requirements
from conftest import REPO

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def test_registry_and_config_check_import_no_heavy_package():
    code = ("import sys, actsparse.registry, actsparse.config; "
            "print(sorted(m for m in ('torch', 'zarr', 'h5py', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.skips])
def test_declared_skips_are_the_projections_the_decode_kernels_replace(method):
    model = tiny_model("llama")
    anatomy = anatomy_of(model)
    spec = METHODS[method]
    layer = model.model.layers[0]
    thresholds = {(0, c): torch.full((_channels(layer, anatomy, c),) if c in spec.per_channel else (), 0.1)
                  for c in requirements(method).masks}
    replaced = set()
    with sparsify_for_decode(model, thresholds, kernel="torch", kv_dense=spec.kv_dense) as handle:
        for parent, name, sparse in handle._replaced:
            if isinstance(sparse, SparseGatedMLP):
                replaced |= {"up", "down"}
            else:
                replaced |= {p for p in PROJECTIONS if getattr(anatomy, p) and getattr(anatomy, p).endswith(name)}
    assert sorted(replaced) == sorted(spec.skips)


def test_a_method_without_skips_has_no_decode_path():
    thresholds = {(0, c): 0.1 for c in requirements("layer").masks}
    with pytest.raises(ValueError, match="sparse decoding thresholds act and"):
        sparsify_for_decode(tiny_model("llama"), thresholds)


def test_a_config_entry_may_name_its_method_and_gets_the_workflow_params():
    config = {"methods": {"teal-greedy": {"method": "teal", "allocation": "greedy"}, "chess": {}},
              "collection": {"seq_len": 64}}
    assert configured("teal-greedy", config) == ("teal", {"allocation": "greedy"})
    assert configured("chess", config) == ("chess", {"seq_len": 64})
