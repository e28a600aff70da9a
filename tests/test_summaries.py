"""Summary tables against numpy on the stored values and on the weights; figures are written."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse.anatomy import anatomy_of
from actsparse.collect import collect_shard, shard_slices
from actsparse.models import tiny_model
from actsparse.stats import EDGES, StoreStats
from actsparse.store import open_store, stats_path
from actsparse.summaries import (
    ACTIVATION_CDF,
    NATURAL_SPARSITY,
    WEIGHT_ZEROS,
    WEIGHTS,
    activation_cdf,
    median_abs,
    merge_stats,
    natural_sparsity,
    plot_activation_cdf,
    plot_natural_sparsity,
    plot_weight_histogram,
    weight_histogram,
    weight_zeros,
)

FAMILIES = ("llama", "mistral", "phi3", "phi", "opt", "gemma")
SEQ, SHARDS, N_TOKENS = 16, 2, 160

# Weight parameter names per matrix type, written out per family (independent of the anatomy).
_LLAMA_LEAVES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                 "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
LEAVES = {
    "llama": _LLAMA_LEAVES,
    "mistral": _LLAMA_LEAVES,
    "gemma": _LLAMA_LEAVES,
    "phi3": {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj", "down": "down_proj"},
    "phi": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "dense", "fc1": "fc1", "fc2": "fc2"},
    "opt": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "fc1": "fc1", "fc2": "fc2"},
}


@cache
def collected(family: str, root: Path) -> tuple[list[Path], dict[tuple[int, str], np.ndarray]]:
    """Two shard stores of every component, and each key's stored values over both, as float64."""
    net = tiny_model(family, seed=5)
    tokens = torch.randint(0, 256, (N_TOKENS,), generator=torch.Generator().manual_seed(1))
    paths, values = [], {}
    for part in shard_slices(N_TOKENS, SHARDS, SEQ):
        path = root / f"{family}-{part.shard_index}.h5"  # the statistics do not depend on the backend
        collect_shard(net, tokens, part, path, anatomy_of(net).components, SEQ, 2, "float16", {}, family, 256)
        paths.append(path)
        with open_store(path) as store:
            for key in store.keys():
                chunk = torch.cat(list(store.iter_chunks(*key))).double().numpy()
                values[key] = np.concatenate([values[key], chunk]) if key in values else chunk
    return paths, values


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stores")


@pytest.mark.parametrize("family", FAMILIES)
def test_natural_sparsity_and_cdf_equal_numpy_on_the_stored_values(root, family) -> None:
    paths, values = collected(family, root)
    stats = merge_stats(stats_path(p) for p in paths)

    sparsity = natural_sparsity(stats, family)
    assert tuple(sparsity.columns) == NATURAL_SPARSITY
    assert len(sparsity) == len(values)
    for row in sparsity.itertuples():
        assert row.model == family
        assert row.zero_fraction == np.mean(values[row.layer, row.component] == 0)

    cdf = activation_cdf(stats, family, EDGES)
    assert tuple(cdf.columns) == ACTIVATION_CDF
    for (layer, component), rows in cdf.groupby(["layer", "component"]):
        magnitude = np.abs(values[layer, component]).ravel()
        expected = (magnitude[:, None] < EDGES[None, :]).mean(axis=0)
        np.testing.assert_allclose(rows["cdf"], expected, rtol=1e-12, atol=0)


def test_opt_relu_outputs_are_naturally_sparse_and_gated_outputs_are_not(root) -> None:
    """The seed paper's Figs 3 and 4 contrast, on random weights: ReLU zeroes about half."""
    opt = natural_sparsity(merge_stats(stats_path(p) for p in collected("opt", root)[0]), "opt")
    llama = natural_sparsity(merge_stats(stats_path(p) for p in collected("llama", root)[0]), "llama")
    assert opt[opt["component"] == "act"]["zero_fraction"].between(0.3, 0.7).all()
    assert (llama[llama["component"] == "gate"]["zero_fraction"] < 0.01).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_median_abs_lies_in_the_bin_of_the_exact_lower_median(root, family) -> None:
    paths, values = collected(family, root)
    stats = merge_stats(stats_path(p) for p in paths)
    for key, x in values.items():
        estimate = median_abs(stats[key])
        exact = np.quantile(np.abs(x), 0.5, method="inverted_cdf")  # the lower median
        if exact == 0:
            assert estimate == 0, key
            continue
        assert abs(np.log10(estimate / exact)) <= 0.1 + 1e-12, key  # one bin: 10 per decade
        assert stats[key].cdf_at(estimate) == pytest.approx(0.5, abs=1e-9), key


def _stats_of(values: torch.Tensor) -> StoreStats:
    stats = StoreStats()
    stats.update(0, "act", values.bfloat16().reshape(-1, 4))
    return stats


def test_median_abs_edge_cases() -> None:
    mostly_zero = torch.tensor([0.0] * 5 + [1.0] * 3)
    assert median_abs(_stats_of(mostly_zero)[0, "act"]) == 0.0
    huge = torch.tensor([1e-3] * 3 + [6e4] * 5)  # more than half past the last edge (1e4)
    assert median_abs(_stats_of(huge)[0, "act"]) == float("inf")
    tiny = torch.tensor([0.0] * 2 + [1e-8 / 2] * 6)  # 2 zeros, 6 below the first edge
    # the underflow bin is spread linearly over [0, 1e-8): half of all values at 1e-8 / 3
    assert median_abs(_stats_of(tiny)[0, "act"]) == pytest.approx(1e-8 / 3, rel=1e-12)


def test_merge_stats_refuses_no_files() -> None:
    with pytest.raises(ValueError, match="no statistics"):
        merge_stats([])


def _weights_by_type(net: torch.nn.Module, family: str) -> dict[str, np.ndarray]:
    """|w| of every matrix type, concatenated over the decoder layers, from parameter names."""
    names = dict(net.named_parameters())
    return {
        matrix: np.concatenate([
            np.abs(w.detach().numpy()).ravel() for name, w in names.items()
            if name.endswith(f".{leaf}.weight") and ".layers." in name
        ])
        for matrix, leaf in LEAVES[family].items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_histogram_equals_numpy_histogram(family) -> None:
    net = copy.deepcopy(tiny_model(family, seed=5))
    first_matrix = next(w for name, w in net.named_parameters() if name.endswith(".weight") and ".layers.0." in name)
    with torch.no_grad():
        first_matrix[:5] = 0  # exact zeros to count
    edges = np.logspace(-5, -1.5, 15)  # leaves values below the first edge and past the last

    table = weight_histogram(net, family, edges)
    assert tuple(table.columns) == WEIGHTS
    weights = _weights_by_type(net, family)
    assert list(dict.fromkeys(table["matrix"])) == list(weights)
    for matrix, magnitude in weights.items():
        rows = table[table["matrix"] == matrix]
        nonzero = magnitude[magnitude > 0]
        expected = [
            np.sum(magnitude == 0),
            np.sum(nonzero < edges[0]),
            *np.histogram(nonzero, bins=edges)[0],
            np.sum(nonzero >= edges[-1]),
        ]
        assert rows["count"].tolist() == expected, matrix
        assert rows["bin_low"].tolist() == [0, 0, *edges]
        assert rows["bin_high"].tolist() == [0, *edges, np.inf]
        np.testing.assert_allclose(rows["fraction"], np.array(expected) / magnitude.size, rtol=1e-12)
        assert np.isnan(rows["log10_count"][rows["count"] == 0]).all()

    zeros = weight_zeros(table)
    assert tuple(zeros.columns) == WEIGHT_ZEROS
    by_matrix = zeros.set_index("matrix")
    for matrix, magnitude in weights.items():
        assert by_matrix.loc[matrix, "parameters"] == magnitude.size
        assert by_matrix.loc[matrix, "zeros"] == np.sum(magnitude == 0)
    assert by_matrix["zeros"].sum() == 5 * first_matrix.shape[1]


def test_weight_histogram_refuses_bad_edges() -> None:
    net = tiny_model("llama")
    for edges in ([0.0, 1.0], [1.0, 0.5], [1.0]):
        with pytest.raises(ValueError, match="edges"):
            weight_histogram(net, "llama", np.array(edges))


def test_figures_are_written_as_png_and_pdf(root, tmp_path) -> None:
    paths, _ = collected("opt", root)
    stats = merge_stats(stats_path(p) for p in paths)
    tables = {
        plot_weight_histogram: weight_histogram(tiny_model("opt"), "opt"),
        plot_natural_sparsity: natural_sparsity(stats, "opt"),
        plot_activation_cdf: activation_cdf(stats, "opt").query("component in ['act', 'h']"),  # fast
    }
    for plot, table in tables.items():
        out = [tmp_path / plot.__name__ / "figure.png", tmp_path / plot.__name__ / "figure.pdf"]
        plot(table, out)
        assert out[0].read_bytes().startswith(b"\x89PNG") and out[1].read_bytes().startswith(b"%PDF")
