"""The final aggregation stage: every result table in every format, the paper layouts, provenance.

``TABLES`` is the one place that names the tables of ``results/tables/``: each table's report
category, title and description and, for the tables this stage builds (the paper layouts and the
provenance table), what they are built from. An earlier rule's table is rendered
(``views.render``) when the workflow targets its CSV, so a new table is one entry here.

Beside every CSV (the source of truth, read by a plain ``pd.read_csv``) this stage writes
``{name}.md``, ``{name}.tex`` (booktabs), ``{name}.html`` (the view the Snakemake report shows)
and ``{name}.provenance.json``: the provenance of the job that wrote these files and the SHA-256
of the CSV they show. No timestamps and no absolute paths, so a rerun writes identical bytes.

``FIGURES`` likewise names the figures drawn from those tables (``actsparse.figures`` draws them).

Every rule parse imports this module (``TABLES``, ``FIGURES``), so it imports only light modules:
each table's builder and figure's drawing function is named, not imported, and is imported by
the job that builds the table or draws the figure.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from actsparse import columns
from actsparse.provenance import write_text

TABLE_DIR = "results/tables"
FIGURE_DIR = "results/figures"
MODEL_DIR = "results/models/{model}"


def table_path(name: str, suffix: str = ".csv") -> str:
    return f"{TABLE_DIR}/{name}{suffix}"


def figure_path(name: str, suffix: str = ".png") -> str:
    return f"{FIGURE_DIR}/{name}{suffix}"


@dataclass(frozen=True)
class Table:
    category: str  # the section of the Snakemake report that shows it
    title: str
    about: str  # what a row is and where its numbers come from (plain text: the report reads it as reST)
    sources: tuple[str, ...] = ()  # what a paper layout is built from; `{model}` stands for every model
    # "module:function" building the frame from the sources' paths; None: an earlier rule writes the CSV
    build: str | None = None
    layout: bool = False  # build rearranges its one source table's frame (a paper layout)


def layout_of(source: str, layout: str) -> dict:
    """A paper layout of another table: ``layout`` ("module:function") takes that table's CSV
    (floats read back exactly) and returns the rearranged frame."""
    return dict(sources=(table_path(source),), build=layout, layout=True)


def provenance_rows(paths: Sequence[Path]):
    """One row per result file (a JSON result or a table's provenance sidecar): what made it."""
    import pandas as pd

    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())["provenance"]
        packages = " ".join(f"{name}={version}" for name, version in record["packages"].items())
        rows.append({"file": str(path), **{k: record[k] for k in columns.PROVENANCE[1:-1]}, "packages": packages})
    return pd.DataFrame(rows, columns=list(columns.PROVENANCE)).sort_values("file", ignore_index=True)


PATTERNS = "Activation patterns"
STATISTICS = "Weights and activations"

TABLES: dict[str, Table] = {
    "models": Table(
        "Models", "Table I: the models",
        "Family, FFN activation, parameters, decoder layers and the FFN's share of the parameters, read from each "
        "imported checkpoint's config and tensor shapes.",
        sources=(MODEL_DIR,), build="actsparse.tables:models_table",
    ),
    "perplexity": Table(
        "Perplexity", "Perplexity per grid point",
        "One row per model, method and target sparsity: the sparsity achieved on the evaluation text, the skippable "
        "share of FFN weight work, token and word perplexity. Method dense at 0.00 is the baseline.",
    ),
    "layer_sparsity": Table(
        "Perplexity", "Achieved sparsity per layer",
        "One row per model, method, target sparsity, decoder layer and thresholded component: the share of that "
        "component's activations zeroed on the evaluation text, as each perplexity result records it.",
        build="actsparse.tables:layer_sparsity",
    ),
    "perplexity_wide": Table(
        "Perplexity", "Perplexity vs sparsity",
        "Perplexity per model and method (rows) and target sparsity (columns); column 0.00 is the dense baseline.",
        **layout_of("perplexity", "actsparse.tables:perplexity_wide"),
    ),
    "perplexity_at_budget": Table(
        "Perplexity", "Perplexity at equal skipped FFN work",
        "Each method's perplexity interpolated (numpy.interp along its curve from the dense baseline) at 30, 40 and "
        "50% skipped FFN weight work, i.e. at equal activated FFN parameters; empty where its curve ends earlier.",
        **layout_of("perplexity", "actsparse.tables:perplexity_at_budget"),
    ),
    "downstream": Table(
        "Downstream tasks", "Zero-shot accuracy per task",
        "acc and acc_norm per model, method, target sparsity and task over n documents; acc_stderr, beside acc in "
        "this view, is the standard error of acc as lm-eval reports it. Task average is the mean over the tasks, "
        "its standard error that of the mean.",
    ),
    "downstream_wide": Table(
        "Downstream tasks", "Zero-shot accuracy, CHESS layout",
        "acc of every task and their average per model, method and target sparsity, and activated_ffn_params: "
        "1 - skipped_ffn_params, the share of FFN weight work still done, and average_stderr, the average's "
        "standard error.",
        **layout_of("downstream", "actsparse.tables:downstream_wide"),
    ),
    "weights": Table(
        STATISTICS, "Weight magnitudes",
        "Histogram of weight magnitudes per matrix type over all decoder layers; exact zeros are the bin [0, 0].",
    ),
    "weight_zeros": Table(
        STATISTICS, "Weight statistics", "Parameters and exact zeros per model and matrix type.",
        **layout_of("weights", "actsparse.summaries:weight_zeros"),
    ),
    "natural_sparsity": Table(
        STATISTICS, "Natural activation sparsity",
        "Fraction of exact zeros per layer and component on the calibration text.",
    ),
    "activation_cdf": Table(
        STATISTICS, "Activation magnitude CDFs",
        "Fraction of activation magnitudes below fixed points per layer and component, and the median magnitude.",
    ),
    "pattern_match": Table(
        PATTERNS, "Pattern match rates",
        "Agreement of active neurons between each sample and its edited variants, per strategy, similarity, layer "
        "and metric.",
    ),
    "pattern_match_table_ii": Table(
        PATTERNS, "Table II: pattern match vs similarity",
        "Match rate per model, strategy, metric, layer and sample (rows) and nominal similarity (columns).",
    ),
    "predictor": Table(
        PATTERNS, "Activity predictor",
        "Precision, recall and F1 of predicting each layer's active neurons: a lookahead MLP per layer on the "
        "residual stream k layers earlier, frequency and hot-set baselines, and long-range MLPs from an early layer; "
        "the predictor's parameters and FLOPs as a fraction of the FFN it predicts.",
    ),
    "prefetch": Table(
        PATTERNS, "Prefetch simulation",
        "Recall, precision and bytes fetched per layer and budget when prefetching the predicted weight rows.",
    ),
    "latency": Table(
        PATTERNS, "Prefetch latency model",
        "Expected per-token FFN time over all layers per hardware profile and prefetch budget: dense, the oracle, and "
        "each predictor with misses fetched on demand; saving_recovered is the share of the oracle's saving it keeps.",
    ),
    "speed": Table(
        "Decoding speed", "Decoding speed",
        "Batch-1 greedy decoding, tokens per second of the dense model and with sparse FFN kernels, and the speedup; "
        "also the kernels keeping every channel and the speedup over them (skipping weights alone).",
    ),
    "provenance": Table(
        "Provenance", "Provenance of every result",
        "Config hash, code version (git describe), device, seed, Python and package versions, as recorded by every "
        "JSON result and every table's provenance sidecar.",
        build="actsparse.publish:provenance_rows",
    ),
}


@dataclass(frozen=True)
class Chart:
    category: str  # the section of the Snakemake report that shows it
    title: str
    about: str  # the caption (plain text: the report reads it as reST)
    tables: tuple[str, ...]  # what it is drawn from, in the order ``draw`` takes them
    draw: str  # "module:function" drawing the figure from those tables' frames


FIGURES: dict[str, Chart] = {
    "layer_sparsity": Chart(
        "Perplexity", "Achieved sparsity per layer",
        "Sparsity each method achieves per decoder layer on the evaluation text (unweighted mean over the components "
        "it thresholds), one panel per model and target level; the dotted line is the target. Numbers: table "
        "Achieved sparsity per layer.",
        ("layer_sparsity",), "actsparse.figures:layer_sparsity",
    ),
    "downstream": Chart(
        "Downstream tasks", "Zero-shot accuracy vs sparsity",
        "Accuracy per task and their average against the sparsity achieved on the task's prompts (which differs "
        "from the target and from the perplexity text's). Error bars: the standard error of the accuracy, "
        "sqrt(var/n) over the n documents as lm-eval reports it; for the average, that of the mean of the tasks. "
        "The dotted line is the dense model. Numbers: table Zero-shot accuracy per task.",
        ("downstream",), "actsparse.figures:downstream",
    ),
    "speed": Chart(
        "Decoding speed", "Speedup vs sparsity",
        "Batch-1 greedy decoding tokens per second with sparse FFN kernels over the dense model's, per method and "
        "target sparsity; the dotted line is dense speed. Numbers: table Decoding speed.",
        ("speed",), "actsparse.figures:speedup",
    ),
    "pattern_match": Chart(
        "Activation patterns", "Table II: match rate vs similarity",
        "Agreement of the active FFN neurons of a sample and its edited variants against the variant's nominal "
        "similarity, mean over samples, per match metric; a colour per layer (first, L/3, 2L/3, last), a line style "
        "per edit strategy. Numbers: table Table II: pattern match vs similarity.",
        ("pattern_match_table_ii",), "actsparse.figures:match_rates",
    ),
}


def drawn(targeted: Collection[str]) -> list[str]:
    """The figures the workflow draws: those whose every table it publishes (a table of this
    stage always, an earlier rule's when ``targeted`` names its CSV)."""
    return [name for name, chart in FIGURES.items()
            if all(TABLES[t].build is not None or table_path(t) in targeted for t in chart.tables)]


def named_function(name: str):
    """The function a ``"module:function"`` name names, its module imported now."""
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def build_table(name: str, inputs: Sequence[Path], out, title: str, about: str, provenance: dict):
    """A table this stage builds: its CSV from ``inputs`` (what its ``build`` reads), then every
    rendering and the sidecar (``views.render``; ``out`` also names the ``csv``)."""
    import pandas as pd

    from actsparse import views

    paths = [Path(p) for p in inputs]
    build = named_function(TABLES[name].build)
    frame = build(pd.read_csv(paths[0], float_precision="round_trip")) if TABLES[name].layout else build(paths)
    write_text(out.csv, frame.to_csv(index=False))
    return views.render(name, out.csv, out, title, about, provenance, frame)
