"""The seed paper's descriptive statistics as tables and figures (its Figs 2 to 7).

* Weights (Fig 2): per weight-matrix type, a histogram of ``|w|`` summed over all decoder layers.
  One tidy table holds both the histogram and the exact-zero counts: exact zeros are the bin
  ``[0, 0]``, followed by ``(0, edges[0])``, the bins ``[edges[i], edges[i+1])`` and
  ``[edges[-1], inf)``, so a matrix's counts add up to its parameters and the ``fraction`` of its
  ``[0, 0]`` row is its zero fraction (``weight_zeros`` reads that summary off the table).
  Matrix types are named by the anatomy: ``q, k, v, o, gate, up, down``; non-gated FFNs have
  ``fc1, fc2``; fused projections stay whole (Phi-3's ``qkv`` and ``gate_up``).
* Natural sparsity (Figs 3 and 4): the fraction of exact zeros per layer and component.
* Activation CDFs (Figs 5 to 7): the fraction of ``|x|`` below fixed points, per layer and
  component, and ``median_abs``, the ``|x|`` below which half the values fall.

Activation tables come from the statistics the store writers collected (``actsparse.stats``),
not from another pass over the stores; shards are merged with ``merge_stats`` first. Their
precision is the histogram's: exact at its edges (10 per decade) and at 0, interpolated in
log10 between edges. ``median_abs`` is that interpolation inverted, so it lies in the same
histogram bin as the exact (lower) median: within a factor 10**0.1 (26%) of it.

Figures use matplotlib's object API (no pyplot, no global backend); each plot function saves
one figure to every path given, the format following the suffix (``.png``, ``.pdf``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import nn

from actsparse.anatomy import COMPONENTS, Anatomy, anatomy_of, decoder_layers
from actsparse.provenance import write_figure
from actsparse.stats import EDGES, StoreStats, TensorStats

WEIGHTS = ("model", "matrix", "bin_low", "bin_high", "count", "log10_count", "fraction")
WEIGHT_ZEROS = ("model", "matrix", "parameters", "zeros", "zero_fraction")
NATURAL_SPARSITY = ("model", "layer", "component", "zero_fraction")
ACTIVATION_CDF = ("model", "layer", "component", "abs_value", "cdf", "median_abs")

# Histogram edges from 1e-4 to 1e2, where the CDF is exact and activations live.
CDF_POINTS = EDGES[(EDGES >= 1e-4 * (1 - 1e-9)) & (EDGES <= 1e2 * (1 + 1e-9))]

_ANATOMY_MATRICES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")
_NON_GATED_NAMES = {"up": "fc1", "down": "fc2"}
_ELEMENTS_PER_STEP = 1 << 24  # |w| is binned in float64 this many elements at a time


def _weight_matrices(anatomy: Anatomy) -> list[tuple[str, str]]:
    """(matrix type, module path in a layer) of every projection the architecture has."""
    matrices = []
    for field in _ANATOMY_MATRICES:
        path = getattr(anatomy, field)
        if path:
            name = field if anatomy.gated else _NON_GATED_NAMES.get(field, field)
            matrices.append((name, path))
    return matrices


def _check_edges(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.isfinite(edges).all() or edges[0] <= 0:
        raise ValueError("edges must be a 1-D array of at least two finite positive values")
    if (np.diff(edges) <= 0).any():
        raise ValueError("edges must increase strictly")
    return edges


def _magnitude_counts(weight: torch.Tensor, edges: torch.Tensor) -> np.ndarray:
    """Counts of ``|w|``: [exact zeros, (0, edges[0]), each [edges[i], edges[i+1]), [edges[-1], inf)]."""
    counts = torch.zeros(len(edges) + 2, dtype=torch.int64)
    for part in weight.detach().reshape(-1).split(_ELEMENTS_PER_STEP):
        magnitude = part.to("cpu", torch.float64).abs()
        counts[0] += int((magnitude == 0).sum())
        counts[1:] += torch.bincount(torch.bucketize(magnitude, edges, right=True), minlength=len(edges) + 1)
    counts[1] -= counts[0]  # the zeros were counted below edges[0] too
    return counts.numpy()


def weight_histogram(model: nn.Module, model_name: str, edges: np.ndarray = EDGES) -> pd.DataFrame:
    """Fig 2: counts of ``|w|`` per weight-matrix type over all layers, zeros as bin ``[0, 0]``."""
    edges = _check_edges(edges)
    anatomy = anatomy_of(model)
    layers = decoder_layers(model, anatomy)
    low = np.concatenate([[0.0, 0.0], edges])
    high = np.concatenate([[0.0], edges, [np.inf]])
    frames = []
    for matrix, path in _weight_matrices(anatomy):
        counts = sum(
            _magnitude_counts(layer.get_submodule(path).weight, torch.from_numpy(edges)) for layer in layers
        )
        log10 = np.where(counts > 0, np.log10(np.maximum(counts, 1)), np.nan)
        frames.append(pd.DataFrame({
            "model": model_name, "matrix": matrix, "bin_low": low, "bin_high": high,
            "count": counts, "log10_count": log10, "fraction": counts / counts.sum(),
        }))
    return pd.concat(frames, ignore_index=True)[list(WEIGHTS)]


def weight_zeros(histogram: pd.DataFrame) -> pd.DataFrame:
    """Parameters and exact zeros per matrix type, read off a ``weight_histogram`` table."""
    grouped = histogram.groupby(["model", "matrix"], sort=False)
    parameters = grouped["count"].sum()
    zero_rows = histogram[histogram["bin_high"] == 0].set_index(["model", "matrix"])["count"]
    summary = pd.DataFrame({"parameters": parameters, "zeros": zero_rows.reindex(parameters.index)})
    summary["zero_fraction"] = summary["zeros"] / summary["parameters"]
    return summary.reset_index()[list(WEIGHT_ZEROS)]


def merge_stats(paths: Iterable[str | os.PathLike]) -> StoreStats:
    """One model's statistics over all its shards (the ``<store>.stats.safetensors`` files)."""
    merged = StoreStats()
    for path in paths:
        merged.merge(StoreStats.load(path))
    if not len(merged):
        raise ValueError("no statistics files were given")
    return merged


def natural_sparsity(stats: StoreStats, model_name: str) -> pd.DataFrame:
    """Figs 3 and 4: the fraction of exact zeros per layer and component."""
    rows = [(model_name, layer, component, stats[layer, component].zero_fraction) for layer, component in stats]
    return pd.DataFrame(rows, columns=list(NATURAL_SPARSITY))


def median_abs(stats: TensorStats) -> float:
    """The ``|x|`` where ``stats.cdf_at`` reaches 0.5: 0 if half the values are zeros, inf if
    half are past the last edge."""
    at_edges = stats.cdf_at(EDGES)
    j = int(np.searchsorted(at_edges, 0.5, side="left"))  # first edge with at least half below
    if j == len(EDGES):
        return float("inf")
    if j == 0:  # inside [0, EDGES[0]): zeros, then the underflow bin spread linearly
        zeros = stats.zero_fraction
        return 0.0 if zeros >= 0.5 else float(EDGES[0] * (0.5 - zeros) / (at_edges[0] - zeros))
    share = (0.5 - at_edges[j - 1]) / (at_edges[j] - at_edges[j - 1])
    return float(10 ** np.interp(share, [0, 1], np.log10(EDGES[j - 1 : j + 1])))


def activation_cdf(stats: StoreStats, model_name: str, points: np.ndarray = CDF_POINTS) -> pd.DataFrame:
    """Figs 5 to 7: fraction of ``|x|`` below each point, per layer and component (long format;
    ``median_abs`` is repeated on every row of its layer and component)."""
    points = np.asarray(points, dtype=np.float64)
    frames = [
        pd.DataFrame({
            "model": model_name, "layer": layer, "component": component, "abs_value": points,
            "cdf": stats[layer, component].cdf_at(points), "median_abs": median_abs(stats[layer, component]),
        })
        for layer, component in stats
    ]
    return pd.concat(frames, ignore_index=True)[list(ACTIVATION_CDF)]


def _figure(rows: int, cols: int, width: float = 6.0, height: float = 4.0) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def _save(figure: Figure, paths: Sequence[str | os.PathLike]) -> None:
    if not paths:
        raise ValueError("give at least one path to save the figure to")
    for path in paths:
        write_figure(figure, path, dpi=150)


def _ordered_components(frame: pd.DataFrame) -> list[str]:
    present = set(frame["component"])
    return [c for c in COMPONENTS if c in present]


def plot_weight_histogram(histogram: pd.DataFrame, paths: Sequence[str | os.PathLike]) -> None:
    """Fig 2: log-count histogram of ``|w|`` per matrix type, one panel per model."""
    models = list(dict.fromkeys(histogram["model"]))
    figure, axes = _figure(1, len(models), width=7.0)
    for ax, model in zip(axes[0], models):
        rows = histogram[histogram["model"] == model]
        binned = rows[(rows["bin_low"] > 0) & np.isfinite(rows["bin_high"])]
        for matrix, bins in binned.groupby("matrix", sort=False):
            zeros = rows.loc[(rows["matrix"] == matrix) & (rows["bin_high"] == 0), "fraction"].iloc[0]
            edges = np.append(bins["bin_low"].to_numpy(), bins["bin_high"].iloc[-1])
            ax.stairs(bins["count"].to_numpy(), edges, label=f"{matrix} (exact zeros {zeros:.2%})")
        occupied = binned[binned["count"] > 0]
        ax.set(xscale="log", yscale="log", xlim=(occupied["bin_low"].min(), occupied["bin_high"].max()),
               title=f"{model}: weight magnitudes", xlabel="|w| (log-spaced bins)",
               ylabel="weights per bin (log scale)")
        ax.legend(fontsize="small")
    _save(figure, paths)


def plot_natural_sparsity(sparsity: pd.DataFrame, paths: Sequence[str | os.PathLike]) -> Figure:
    """Figs 3 and 4: per-layer zero fraction, one line per component, one panel per model, on a
    log axis: a SwiGLU model's exact zeros are rare (a linear axis shows one bar), a ReLU model's
    common. A layer without exact zeros has no point; the legend says in how many layers that is."""
    models = list(dict.fromkeys(sparsity["model"]))
    figure, axes = _figure(len(models), 1, width=10.0)
    for ax, model in zip(axes[:, 0], models):
        rows = sparsity[sparsity["model"] == model]
        for component in _ordered_components(rows):
            part = rows[rows["component"] == component].sort_values("layer")
            share = 100 * part["zero_fraction"].where(part["zero_fraction"] > 0)
            none = int(share.isna().sum())
            ax.plot(part["layer"], share, marker="o", label=component + (f" (no zeros in {none} layers)" if none else ""))
        ax.set(title=f"{model}: natural activation sparsity", xlabel="layer", ylabel="exact zeros (%, log scale)")
        if not (rows["zero_fraction"] > 0).any():
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"no exact zeros in any of the {rows['layer'].nunique()} layers of "
                    f"{', '.join(_ordered_components(rows))}", transform=ax.transAxes, ha="center")
            continue
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small", ncols=min(len(_ordered_components(rows)), 3))
    _save(figure, paths)
    return figure


def plot_activation_cdf(cdf: pd.DataFrame, paths: Sequence[str | os.PathLike]) -> None:
    """Figs 5 to 7: CDF of ``|x|``, one curve per layer, one panel per model and component."""
    panels = [(model, component) for model in dict.fromkeys(cdf["model"]) for component in _ordered_components(cdf)]
    cols = min(3, len(panels))
    figure, axes = _figure(math.ceil(len(panels) / cols), cols, width=5.0)
    colour = ScalarMappable(Normalize(cdf["layer"].min(), cdf["layer"].max()), colormaps["viridis"])
    for ax, (model, component) in zip(axes.flat, panels):
        rows = cdf[(cdf["model"] == model) & (cdf["component"] == component)]
        for layer, curve in rows.groupby("layer"):
            ax.plot(curve["abs_value"], curve["cdf"], color=colour.to_rgba(layer), linewidth=1)
        ax.set(xscale="log", ylim=(0, 1), title=f"{model}: {component}",
               xlabel="|x|", ylabel="fraction of values below |x|")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    figure.colorbar(colour, ax=axes.ravel().tolist(), label="layer")
    _save(figure, paths)
