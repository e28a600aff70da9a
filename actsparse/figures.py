"""The figures drawn from the result tables, each with a title, labelled axes, a legend and a
caption in the report.

``publish.FIGURES`` is the one place that names them: the tables a figure is drawn from (names
of ``publish.TABLES``), its report category, title, caption and the function here that draws it.
The workflow draws ``results/figures/{name}.png`` and ``.pdf`` for every figure whose tables it
publishes (``publish.drawn``). All share one layout (``panels``, ``finish``): one panel per model (and level, task
or metric), a dotted grey line for the dense reference where there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from actsparse import columns, tables
from actsparse.provenance import write_figure
from actsparse.publish import FIGURES, named_function

REFERENCE = dict(color="grey", linestyle=":", linewidth=1.2)  # the dense baseline, a target level
LINE_STYLES = ("-", "--", "-.", ":")


def panels(
    keys: Sequence, title: str, cols: int = 3, width: float = 5.0, height: float = 3.8
) -> tuple[Figure, list[Axes]]:
    """A figure titled ``title`` with one panel per key, ``cols`` to a row."""
    cols = max(1, min(cols, len(keys)))
    figure = Figure(figsize=(max(7.0, width * cols), height * math.ceil(len(keys) / cols)), layout="constrained")
    axes = figure.subplots(math.ceil(len(keys) / cols), cols, squeeze=False).ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    figure.suptitle(title)
    return figure, list(axes[: len(keys)])


def finish(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """A panel's title, axis labels, grid and legend."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def layer_sparsity(frame: pd.DataFrame) -> Figure:
    """Achieved sparsity per layer, one panel per model and target level, one line per method
    (the mean over the components the method thresholds in that layer), the target dotted."""
    keys = list(frame[["model", "target_sparsity"]].drop_duplicates().itertuples(index=False, name=None))
    figure, axes = panels(keys, "Achieved sparsity per layer on the evaluation text")
    for ax, (model, target) in zip(axes, keys):
        rows = frame[(frame.model == model) & (frame.target_sparsity == target)]
        for method, part in rows.groupby("method"):
            per_layer = part.groupby("layer").achieved_sparsity.mean()
            ax.plot(per_layer.index, per_layer.values, marker="o", label=method)
        ax.axhline(target, **REFERENCE, label=f"target {target:.2f}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        finish(ax, f"{model}, target {target:.2f}", "layer", "achieved sparsity (mean over components)")
    return figure


def downstream(frame: pd.DataFrame) -> Figure:
    """Accuracy against the sparsity achieved on the task's prompts, with lm-eval's standard
    error as error bars, one panel per model and task (and their average), one line per method
    from the dense baseline, the dense accuracy dotted."""
    keys = list(frame[["model", "task"]].drop_duplicates().itertuples(index=False, name=None))
    figure, axes = panels(keys, "Zero-shot accuracy vs achieved sparsity (error bars: standard error)")
    for ax, (model, task) in zip(axes, keys):
        rows = frame[(frame.model == model) & (frame.task == task)]
        dense = rows[rows.method == columns.DENSE]
        for method, curve in tables.with_dense_baseline(rows).groupby("method"):
            curve = curve.sort_values("target_sparsity")
            ax.errorbar(curve.achieved_sparsity, curve.acc, yerr=curve.acc_stderr, marker="o", capsize=3, label=method)
        if len(dense):
            ax.axhline(dense.acc.iloc[0], **REFERENCE, label="dense")
        average = task == columns.AVERAGE_TASK
        size = f"mean of {len(set(frame.task)) - 1} tasks" if average else f"n = {int(rows.n.max())}"
        finish(ax, f"{model}: {task} ({size})", "achieved sparsity on the task's prompts", "accuracy")
    return figure


def speedup(frame: pd.DataFrame) -> Figure:
    """Decoding speedup over dense against sparsity, one panel per model and device, one line per
    method, its speedups over the dense model on the kernels' engine (dash-dot), over its kernels
    keeping every channel (dotted) and of the compiled step (solid, crosses; each where measured)
    and its weight-bytes bound dashed, in the same colour; 1 (dense speed) dotted grey."""
    keys = list(frame[["model", "device"]].drop_duplicates().itertuples(index=False, name=None))
    figure, axes = panels(keys, "Batch-1 decoding speedup of sparse FFN kernels")
    for ax, (model, device) in zip(axes, keys):
        rows = frame[(frame.model == model) & (frame.device == device)]
        for method, curve in rows.groupby("method"):
            curve = curve.sort_values("sparsity")
            (line,) = ax.plot(curve.sparsity, curve.speedup, marker="o", label=method)
            others = (("native_speedup", "-.", "over dense on the kernels' engine"),
                      ("kernel_speedup", ":", "over full-activity kernels"), ("compiled_speedup", "-", "compiled step"))
            for column, style, label in others:
                if curve[column].notna().any():  # results written before it was measured lack it
                    ax.plot(curve.sparsity, curve[column], marker="x", linestyle=style, color=line.get_color(),
                            label=f"{method} {label}")
            ax.plot(curve.sparsity, curve.bound, linestyle="--", color=line.get_color(), label=f"{method} bound")
        ax.axhline(1.0, **REFERENCE, label="dense")
        finish(ax, f"{model} on {device}", "target sparsity", "speedup over dense (x)")
    return figure


def match_rates(table_ii: pd.DataFrame) -> Figure:
    """Table II as lines: match rate (mean over samples) against the variant's nominal
    similarity, one panel per model and metric, a colour per layer and a line style per edit
    strategy."""
    levels = [c for c in table_ii.columns if c not in columns.TABLE_II_KEYS]
    long = table_ii.melt(id_vars=list(columns.TABLE_II_KEYS), value_vars=levels, var_name="similarity",
                         value_name="match_rate").astype({"similarity": float})
    keys = list(long[["model", "metric"]].drop_duplicates().itertuples(index=False, name=None))
    strategies, layers = sorted(set(long.strategy)), sorted(set(long.layer))
    figure, axes = panels(keys, "Table II: activation pattern match vs input similarity")
    for ax, (model, metric) in zip(axes, keys):
        rows = long[(long.model == model) & (long.metric == metric)]
        for (strategy, layer), part in rows.groupby(["strategy", "layer"]):
            mean = part.groupby("similarity").match_rate.mean()
            ax.plot(mean.index, mean.values, marker="o", color=f"C{layers.index(layer) % 10}",
                    linestyle=LINE_STYLES[strategies.index(strategy) % len(LINE_STYLES)],
                    label=f"{strategy}, layer {layer}")
        finish(ax, f"{model}: {metric}", "nominal similarity of the edited input", "match rate")
    return figure


def draw(name: str, table_csvs: Sequence[Path], png: Path) -> Figure:
    """Figure ``name`` from its tables' CSVs (floats read back exactly), saved as PNG and PDF."""
    figure = named_function(FIGURES[name].draw)(*[pd.read_csv(p, float_precision="round_trip") for p in table_csvs])
    for path in (Path(png), Path(png).with_suffix(".pdf")):
        write_figure(figure, path, dpi=150)
    return figure
