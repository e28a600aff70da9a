"""Aggregation of per-job results into tables and the figures drawn from them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from actsparse import columns  # noqa: E402
from actsparse.anatomy import activation_name, anatomy_for  # noqa: E402
from actsparse.provenance import write_figure  # noqa: E402


def collect_results(paths: Sequence[Path], table_columns: Sequence[str]) -> pd.DataFrame:
    """One row per JSON result, sorted by the leading columns so reruns write identical bytes."""
    rows = [json.loads(Path(p).read_text()) for p in paths]
    frame = pd.DataFrame(rows, columns=list(table_columns))
    return frame.sort_values(list(table_columns[:4])).reset_index(drop=True)


def with_dense_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Every method's curve starts at the dense baseline (method "dense", sparsity 0)."""
    dense = frame[frame.method == columns.DENSE]
    copies = [dense.assign(method=m) for m in frame.method.unique() if m != columns.DENSE]
    return pd.concat([frame[frame.method != columns.DENSE], *copies], ignore_index=True)


def stderr_of_mean(stderrs: pd.Series) -> float:
    """Standard error of the unweighted mean of independent task accuracies: sqrt(sum se_i^2) / k."""
    return math.sqrt((stderrs**2).sum()) / len(stderrs)


def downstream(paths: Sequence[Path]) -> pd.DataFrame:
    """Per-task rows plus, per (model, method, sparsity), the mean over tasks as task "average"."""
    return with_task_average(collect_results(paths, columns.DOWNSTREAM))


def with_task_average(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-task rows (``columns.DOWNSTREAM``) and their mean per (model, method, sparsity).

    ``acc_stderr`` of a task is the harness's (``tasks.summarize``: the sample standard deviation
    of the per-example hits over sqrt(n)); of the average, ``stderr_of_mean`` of the tasks'."""
    keys = ["model", "method", "target_sparsity"]
    average = frame.groupby(keys, as_index=False).agg(
        acc=("acc", "mean"),
        acc_stderr=("acc_stderr", stderr_of_mean),
        acc_norm=("acc_norm", "mean"),
        n=("n", "sum"),
        achieved_sparsity=("achieved_sparsity", "mean"),
        skipped_ffn_params=("skipped_ffn_params", "mean"),
    )
    average["task"] = columns.AVERAGE_TASK
    table = pd.concat([frame, average[list(columns.DOWNSTREAM)]], ignore_index=True)
    table["is_average"] = table.task == columns.AVERAGE_TASK  # the average closes each group
    return table.sort_values(keys + ["is_average", "task"]).drop(columns="is_average").reset_index(drop=True)


def layer_sparsity(paths: Sequence[Path]) -> pd.DataFrame:
    """The per-layer sparsity every ppl result records (``layers.{i}.{component}`` keys), one row
    per (model, method, target sparsity, layer, component); the dense baseline has none."""
    rows = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        for key, sparsity in result["layer_sparsity"].items():
            _, layer, component = key.split(".", 2)
            rows.append([*(result[k] for k in columns.LAYER_SPARSITY[:3]), int(layer), component, sparsity])
    frame = pd.DataFrame(rows, columns=list(columns.LAYER_SPARSITY))
    return frame.sort_values(list(columns.LAYER_SPARSITY[:5]), ignore_index=True)


def perplexity_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """The perplexity table as papers print it: rows (model, method), one ppl column per target
    sparsity (labelled with two decimals, as in paths), ``0.00`` being the dense baseline."""
    frame = with_dense_baseline(frame)
    wide = frame.pivot(index=list(columns.PERPLEXITY_WIDE_KEYS), columns="target_sparsity", values="ppl")
    wide.columns = [f"{s:.2f}" for s in wide.columns]
    return wide.reset_index()


def _curves(frame: pd.DataFrame):
    """((model, method), its points sorted by skipped FFN work), each method from the dense baseline."""
    frame = with_dense_baseline(frame)
    for key, curve in frame.groupby(["model", "method"], sort=True):
        yield key, curve.sort_values(["skipped_ffn_params", "target_sparsity"])


def perplexity_at_budget(frame: pd.DataFrame, budgets: Sequence[float] = columns.BUDGETS) -> pd.DataFrame:
    """Each method's perplexity at equal skipped FFN weight work: ``numpy.interp`` of ppl over
    skipped_ffn_params along its curve (dense baseline first), NaN past the curve's last point
    (never extrapolated). Methods reach different skipped work at the same target sparsity, so
    this, not the target, is where they compare at equal cost."""
    rows = []
    for (model, method), curve in _curves(frame):
        skipped, ppl = curve.skipped_ffn_params.to_numpy(), curve.ppl.to_numpy()
        for budget in budgets:
            value = np.interp(budget, skipped, ppl, left=np.nan, right=np.nan)
            rows.append((model, method, budget, 1 - budget, float(value)))
    return pd.DataFrame(rows, columns=list(columns.PERPLEXITY_AT_BUDGET))


def plot_perplexity_at_cost(frame: pd.DataFrame, png: Path) -> None:
    """Perplexity against the activated FFN parameters (1 - skipped work) and against the achieved
    sparsity, one row of two panels per model, one curve per method from the dense baseline."""
    models = sorted(frame.model.unique())
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    fig.suptitle("Perplexity at equal cost: against activated FFN parameters and achieved sparsity")
    for row, model in zip(axes, models):
        for (_, method), curve in _curves(frame[frame.model == model]):
            row[0].plot(1 - curve.skipped_ffn_params, curve.ppl, marker="o", label=method)
            row[1].plot(curve.achieved_sparsity, curve.ppl, marker="o", label=method)
        row[0].set(xlabel="activated FFN parameters (1 - skipped FFN weight work)")
        row[1].set(xlabel="achieved sparsity")
        for ax in row:
            _finish_perplexity_panel(ax, frame, model)
    fig.tight_layout()
    save_figure(fig, png)


def _finish_perplexity_panel(ax, frame: pd.DataFrame, model: str) -> None:
    """A perplexity panel's title, log axis, grid, the dense model's perplexity as a dotted line
    (where the frame has it) and the legend."""
    from actsparse.figures import REFERENCE  # figures draws from this module's tables

    dense = frame[(frame.model == model) & (frame.method == columns.DENSE)].ppl
    if len(dense):
        ax.axhline(dense.iloc[0], **REFERENCE, label="dense")
    ax.set(title=model, ylabel="perplexity (log scale)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend()


def downstream_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """CHESS's downstream table: rows (model, method, target sparsity); acc of every task in the
    table's order, their average, the fraction of FFN weight work still done, and the average's
    standard error."""
    keys = list(columns.DOWNSTREAM_WIDE_KEYS)
    tasks = [t for t in dict.fromkeys(frame.task) if t != columns.AVERAGE_TASK] + [columns.AVERAGE_TASK]
    wide = frame.pivot(index=keys, columns="task", values="acc")[tasks]
    average = frame[frame.task == columns.AVERAGE_TASK].set_index(keys)
    wide[columns.ACTIVATED_FFN_PARAMS] = 1 - average.skipped_ffn_params
    wide[columns.AVERAGE_STDERR] = average.acc_stderr
    wide.columns.name = None
    return wide.reset_index()


def model_facts(model_dir: Path) -> dict:
    """One row of the seed paper's Table I, from the checkpoint's config.json and the tensor shapes
    in its safetensors headers: no weight is read, so a 70B model costs what a tiny one does.
    Counts match ``anatomy.model_summary`` of the loaded model (tied weights are stored once)."""
    config = AutoConfig.from_pretrained(model_dir)
    anatomy = anatomy_for(config.model_type)
    projections = "|".join(map(re.escape, anatomy.ffn_projections))
    ffn = re.compile(rf"{re.escape(anatomy.layers)}\.\d+\.({projections})\.")  # e.g. model.layers.3.mlp.up_proj.
    sizes = _tensor_sizes(Path(model_dir))
    total = sum(sizes.values())
    return {
        "model": Path(model_dir).name,
        "family": anatomy.family,
        "activation": activation_name(config),
        "parameters": total,
        "layers": config.num_hidden_layers,
        "ffn_share": sum(n for name, n in sizes.items() if ffn.match(name)) / total,
    }


def _tensor_sizes(model_dir: Path) -> dict[str, int]:
    """Elements of every stored tensor, over all shards of the checkpoint."""
    sizes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as stored:
            sizes |= {name: math.prod(stored.get_slice(name).get_shape()) for name in stored.keys()}
    return sizes


def models_table(model_dirs: Sequence[Path]) -> pd.DataFrame:
    """The seed paper's Table I: family, activation, parameters, layers and FFN share per model."""
    frame = pd.DataFrame([model_facts(d) for d in model_dirs], columns=list(columns.MODELS))
    return frame.sort_values("model", ignore_index=True)


def plot_perplexity(frame: pd.DataFrame, png: Path) -> None:
    """The seed paper's Fig 8: perplexity against achieved sparsity, one panel per model and one
    curve per method, each starting at the dense baseline."""
    curves = with_dense_baseline(frame)
    models = sorted(frame.model.unique())
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    fig.suptitle("Perplexity against target sparsity")
    for ax, model in zip(axes[0], models):
        for method, curve in curves[curves.model == model].groupby("method"):
            curve = curve.sort_values("target_sparsity")
            ax.plot(curve.target_sparsity, curve.ppl, marker="o", label=method)
        ax.set(xlabel="target sparsity")
        _finish_perplexity_panel(ax, frame, model)
    fig.tight_layout()
    save_figure(fig, png)


def save_figure(fig, png: Path) -> None:
    """PNG and PDF side by side, without timestamps so reruns write identical bytes."""
    png = Path(png)
    for path in (png, png.with_suffix(".pdf")):
        write_figure(fig, path, dpi=150)
    plt.close(fig)
