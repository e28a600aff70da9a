"""The final aggregation stage: every result table in every format, the paper layouts, provenance.

``TABLES`` is the one place that names the tables of ``results/tables/``: each table's report
category, title and description and, for the tables this stage builds (the paper layouts and the
provenance table), what they are built from. An earlier rule's table is rendered
(``formats.render``) when the workflow targets its CSV, so a new table is one entry here.

Beside every CSV (the source of truth, read by a plain ``pd.read_csv``) this stage writes
``{name}.md``, ``{name}.tex`` (booktabs), ``{name}.html`` (the view the Snakemake report shows)
and ``{name}.provenance.json``: the provenance of the job that wrote these files and the SHA-256
of the CSV they show. No timestamps and no absolute paths, so a rerun writes identical bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from actsparse import columns, formats, summaries, tables
from actsparse.provenance import write_text

TABLE_DIR = "results/tables"
MODEL_DIR = "results/models/{model}"


def table_path(name: str, suffix: str = ".csv") -> str:
    return f"{TABLE_DIR}/{name}{suffix}"


@dataclass(frozen=True)
class Table:
    category: str  # the section of the Snakemake report that shows it
    title: str
    about: str  # what a row is and where its numbers come from (plain text: the report reads it as reST)
    sources: tuple[str, ...] = ()  # what a paper layout is built from; `{model}` stands for every model
    build: Callable[[list[Path]], pd.DataFrame] | None = None  # None: an earlier rule writes the CSV


def layout_of(source: str, layout: Callable[[pd.DataFrame], pd.DataFrame]) -> dict:
    """A paper layout of another table: that table's CSV in (floats read back exactly), the
    rearranged frame out."""
    def build(paths: list[Path]) -> pd.DataFrame:
        return layout(pd.read_csv(paths[0], float_precision="round_trip"))

    return dict(sources=(table_path(source),), build=build)


def provenance_rows(paths: Sequence[Path]) -> pd.DataFrame:
    """One row per result file (a JSON result or a table's provenance sidecar): what made it."""
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
        sources=(MODEL_DIR,), build=tables.models_table,
    ),
    "perplexity": Table(
        "Perplexity", "Perplexity per grid point",
        "One row per model, method and target sparsity: the sparsity achieved on the evaluation text, the skippable "
        "share of FFN weight work, token and word perplexity. Method dense at 0.00 is the baseline.",
    ),
    "perplexity_wide": Table(
        "Perplexity", "Perplexity vs sparsity",
        "Perplexity per model and method (rows) and target sparsity (columns); column 0.00 is the dense baseline.",
        **layout_of("perplexity", tables.perplexity_wide),
    ),
    "downstream": Table(
        "Downstream tasks", "Zero-shot accuracy per task",
        "acc and acc_norm per model, method, target sparsity and task; task average is the mean over the tasks.",
    ),
    "downstream_wide": Table(
        "Downstream tasks", "Zero-shot accuracy, CHESS layout",
        "acc of every task and their average per model, method and target sparsity, and activated_ffn_params: "
        "1 - skipped_ffn_params, the share of FFN weight work still done.",
        **layout_of("downstream", tables.downstream_wide),
    ),
    "weights": Table(
        STATISTICS, "Weight magnitudes",
        "Histogram of weight magnitudes per matrix type over all decoder layers; exact zeros are the bin [0, 0].",
    ),
    "weight_zeros": Table(
        STATISTICS, "Weight statistics", "Parameters and exact zeros per model and matrix type.",
        **layout_of("weights", summaries.weight_zeros),
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
        "Batch-1 greedy decoding, tokens per second of the dense model and with sparse FFN kernels, and the speedup.",
    ),
    "provenance": Table(
        "Provenance", "Provenance of every result",
        "Config hash, code version (git describe), device, seed, Python and package versions, as recorded by every "
        "JSON result and every table's provenance sidecar.",
        build=provenance_rows,
    ),
}


def build_table(name: str, inputs: Sequence[Path], out, title: str, about: str, provenance: dict) -> pd.DataFrame:
    """A table this stage builds: its CSV from ``inputs`` (what its ``build`` reads), then every
    rendering and the sidecar (``formats.write``; ``out`` also names the ``csv``)."""
    frame = TABLES[name].build([Path(p) for p in inputs])
    write_text(out.csv, frame.to_csv(index=False))
    formats.write(frame, out.csv, out, title, about, provenance)
    return frame
