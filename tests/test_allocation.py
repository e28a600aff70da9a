"""Greedy allocation on a tiny model: it reaches each requested parameter-weighted average, never
has more block error than the uniform allocation at that level, and is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsparse import allocation, methods
from actsparse.hooks import apply_thresholds, capture
from actsparse.models import tiny_model

CHECKED = (0.1, 0.25, 0.4, 0.5, 0.63, 0.8, 0.9)
# TEAL's weights, read off the module shapes: the projections each input feeds
CONSUMERS = {"ffn_in": ("mlp.gate_proj", "mlp.up_proj"), "h": ("mlp.down_proj",),
             "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_in": ("self_attn.o_proj",)}


@pytest.fixture(scope="module")
def searched():
    """A tiny model, its calibration tokens, TEAL's threshold grid on them (numpy percentiles of
    the dense |values|) and the greedy allocation."""
    model = tiny_model("llama", seed=0)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    values = {}
    with capture(model, CONSUMERS, lambda layer, c, v: values.setdefault((layer, c), v)), torch.no_grad():
        model(ids)
    grid = {key: torch.from_numpy(np.percentile(v.abs().reshape(-1).numpy(), 100 * np.asarray(methods.GRID)))
            for key, v in values.items()}
    return model, ids, grid, allocation.allocate(model, ids, grid, methods.GRID)


def weights(model, layer: int) -> dict[str, int]:
    block = model.model.layers[layer]
    return {c: sum(block.get_submodule(p).weight.numel() for p in paths) for c, paths in CONSUMERS.items()}


@torch.no_grad()
def block_error(model, ids, grid, layer: int, levels: dict[str, float]) -> float:
    """The layer's output error with its components masked at ``levels``, in a whole-model run
    (earlier layers dense, so its input is the dense one)."""
    outputs = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    model(ids)
    thresholds = {(layer, c): grid[layer, c][round(s * 100)] for c, s in levels.items()}
    with apply_thresholds(model, thresholds):
        model(ids)
    handle.remove()
    return float(torch.linalg.vector_norm(outputs[1] - outputs[0], dim=-1).mean())


def test_greedy_reaches_each_weighted_average_without_more_error_than_uniform(searched):
    model, ids, grid, allocated = searched
    layers = sorted({layer for layer, _ in grid})
    greedy_used = 0
    for layer in layers:
        w = weights(model, layer)
        for level in CHECKED:
            index = round(level * 100)
            levels = {c: float(allocated[layer, c][index]) for c in CONSUMERS}
            average = sum(w[c] * s for c, s in levels.items()) / sum(w.values())
            assert level - 1e-9 <= average <= level + 0.01, (layer, level, levels)  # the crossing step cut at 0.01
            uniform = {c: level for c in CONSUMERS}
            if levels != uniform:
                greedy_used += 1
                assert block_error(model, ids, grid, layer, levels) <= block_error(model, ids, grid, layer, uniform)
    assert greedy_used > len(layers) * len(CHECKED) // 2  # the search, not the guard, decides most levels


def test_greedy_allocation_is_deterministic(searched):
    model, ids, grid, allocated = searched
    again = allocation.allocate(model, ids, grid, methods.GRID)
    assert sorted(again) == sorted(allocated)
    for key, levels in allocated.items():
        np.testing.assert_array_equal(again[key], levels)


def test_an_allocation_selects_each_keys_thresholds_at_its_level(searched, tmp_path):
    _, _, grid, allocated = searched
    grid_path, allocation_path = tmp_path / "grid.safetensors", tmp_path / "allocation.safetensors"
    methods.save_grid(grid_path, {s: {key: t[i] for key, t in grid.items()} for i, s in enumerate(methods.GRID)},
                      {"method": "teal"})
    methods.save_allocation(allocation_path, allocated, methods.GRID, {"method": "teal"})
    thresholds, metadata = methods.load_allocated(grid_path, allocation_path, 0.5)
    for key, t in thresholds.items():
        level = allocated[key][50]
        assert metadata["allocated_sparsity"][methods.tensor_name(*key)] == level
        torch.testing.assert_close(t, grid[key][round(level * 100)], rtol=0, atol=0)
