"""Aggregation of per-job results into tables and the figures drawn from them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from actsparse import columns  # noqa: E402


def collect_results(paths: Sequence[Path], table_columns: Sequence[str]) -> pd.DataFrame:
    """One row per JSON result, sorted by the leading columns so reruns write identical bytes."""
    rows = [json.loads(Path(p).read_text()) for p in paths]
    frame = pd.DataFrame(rows, columns=list(table_columns))
    return frame.sort_values(list(table_columns[:4])).reset_index(drop=True)


def with_dense_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Every method's curve starts at the dense baseline (method "dense", sparsity 0)."""
    dense = frame[frame.method == "dense"]
    copies = [dense.assign(method=m) for m in frame.method.unique() if m != "dense"]
    return pd.concat([frame[frame.method != "dense"], *copies], ignore_index=True)


def downstream(paths: Sequence[Path]) -> pd.DataFrame:
    """Per-task rows plus, per (model, method, sparsity), the mean over tasks as task "average"."""
    frame = collect_results(paths, columns.DOWNSTREAM)
    keys = ["model", "method", "target_sparsity"]
    average = frame.groupby(keys, as_index=False).agg(
        acc=("acc", "mean"),
        acc_norm=("acc_norm", "mean"),
        n=("n", "sum"),
        achieved_sparsity=("achieved_sparsity", "mean"),
        skipped_ffn_params=("skipped_ffn_params", "mean"),
    )
    average["task"] = columns.AVERAGE_TASK
    table = pd.concat([frame, average[list(columns.DOWNSTREAM)]], ignore_index=True)
    table["is_average"] = table.task == columns.AVERAGE_TASK  # the average closes each group
    return table.sort_values(keys + ["is_average", "task"]).drop(columns="is_average").reset_index(drop=True)


def plot_perplexity(frame: pd.DataFrame, png: Path) -> None:
    """The seed paper's Fig 8: perplexity against achieved sparsity, one panel per model and one
    curve per method, each starting at the dense baseline."""
    frame = with_dense_baseline(frame)
    models = sorted(frame.model.unique())
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method, curve in frame[frame.model == model].groupby("method"):
            curve = curve.sort_values("target_sparsity")
            ax.plot(curve.target_sparsity, curve.ppl, marker="o", label=method)
        ax.set(title=model, xlabel="target sparsity", ylabel="perplexity (log scale)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, png)


def save_figure(fig, png: Path) -> None:
    """PNG and PDF side by side, without timestamps so reruns write identical bytes."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=150, metadata={"Software": None})
    fig.savefig(png.with_suffix(".pdf"), metadata={"Creator": None, "Producer": None, "CreationDate": None})
    plt.close(fig)
