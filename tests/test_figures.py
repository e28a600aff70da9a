"""The figures drawn from result tables: what each panel plots equals an independent computation
on small synthetic tables, and every panel has its title, axis labels and legend."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from actsparse import columns, figures, pattern_study, publish, tables
from actsparse.summaries import plot_natural_sparsity

RNG = np.random.default_rng(0)
TASKS = ("piqa", "boolq")
GRID = (("dense", 0.0), ("cats", 0.5), ("cats", 0.7), ("teal", 0.5))


def assert_labelled(figure) -> None:
    """Every visible panel has a title, both axis labels and a legend."""
    assert figure.get_suptitle()
    for ax in figure.axes:
        if ax.get_visible():
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax
            assert ax.get_legend() is not None and ax.get_legend().get_texts(), ax.get_title()


def panel(figure, title_start: str):
    (ax,) = [ax for ax in figure.axes if ax.get_title().startswith(title_start)]
    return ax


def downstream_example() -> tuple[pd.DataFrame, dict]:
    """A downstream table from per-document 0/1 accuracies (each task's acc_stderr lm-eval's,
    sqrt(var(ddof=1) / n)), and those accuracies."""
    correct, rows = {}, []
    for method, sparsity in GRID:
        for n, task in zip((40, 25), TASKS):
            hits = correct[method, sparsity, task] = RNG.random(n) < 0.6 - sparsity / 3
            rows.append(("m", method, sparsity, task, hits.mean(), np.sqrt(hits.var(ddof=1) / n), hits.mean(), n,
                         sparsity + 0.05, sparsity * 0.8))
    return tables.with_task_average(pd.DataFrame(rows, columns=list(columns.DOWNSTREAM))), correct


def error_bars(ax, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, half-length of the error bar) of the curve ``label`` of a panel."""
    (container,) = [c for c in ax.containers if c.get_label() == label]
    segments = np.array(container.lines[2][0].get_segments())
    centre = segments.mean(axis=1)
    return centre[:, 0], centre[:, 1], (segments[:, 1, 1] - segments[:, 0, 1]) / 2


def test_downstream_error_bars_are_lm_evals_standard_error(tmp_path):
    frame, correct = downstream_example()
    figure = figures.downstream(frame)
    assert_labelled(figure)
    for task in TASKS:
        ax = panel(figure, f"m: {task}")
        for method in ("cats", "teal"):
            levels = [s for m, s in GRID if m in ("dense", method)]
            x, y, half = error_bars(ax, method)
            per_doc = [correct["dense" if s == 0 else method, s, task] for s in levels]
            assert y == pytest.approx([c.mean() for c in per_doc])
            assert half == pytest.approx([np.sqrt(c.var(ddof=1) / len(c)) for c in per_doc])
            assert x == pytest.approx([s + 0.05 for s in levels])  # achieved, not target, sparsity
    _, y, half = error_bars(panel(figure, f"m: {columns.AVERAGE_TASK}"), "cats")
    task_stderr = [[np.sqrt(correct[m, s, t].var(ddof=1) / len(correct[m, s, t])) for t in TASKS]
                   for m, s in (("dense", 0.0), ("cats", 0.5), ("cats", 0.7))]
    assert half == pytest.approx([np.sqrt(np.sum(np.square(se))) / len(TASKS) for se in task_stderr])


def test_a_tables_own_stderr_column_is_plotted_as_it_is():
    frame, _ = downstream_example()
    frame[columns.ACC_STDERR] = 0.01 * np.arange(len(frame))
    _, _, half = error_bars(panel(figures.downstream(frame), "m: piqa"), "teal")
    piqa = frame[frame.task == "piqa"].set_index("method")[columns.ACC_STDERR]
    assert half == pytest.approx([piqa["dense"], piqa["teal"]])


def test_layer_sparsity_is_read_from_ppl_results_and_plotted_per_layer(tmp_path):
    paths = []
    for method, sparsity in GRID:
        layers = {} if method == "dense" else {
            f"layers.{i}.{c}": float(RNG.uniform(0.3, 0.9)) for i in range(3) for c in ("act", "q")
        }
        paths.append(tmp_path / f"{method}-{sparsity}.json")
        paths[-1].write_text(json.dumps({"model": "m", "method": method, "target_sparsity": sparsity,
                                         "layer_sparsity": layers, "ppl": 10.0}))
    table = tables.layer_sparsity(paths)
    assert tuple(table.columns) == columns.LAYER_SPARSITY and len(table) == 3 * 3 * 2
    figure = figures.layer_sparsity(table)
    assert_labelled(figure)
    ax = panel(figure, "m, target 0.50")
    cats = json.loads(paths[1].read_text())["layer_sparsity"]
    (line,) = [line for line in ax.get_lines() if line.get_label() == "cats"]
    assert line.get_ydata() == pytest.approx([(cats[f"layers.{i}.act"] + cats[f"layers.{i}.q"]) / 2 for i in range(3)])
    (target,) = [line for line in ax.get_lines() if line.get_label() == "target 0.50"]
    assert set(target.get_ydata()) == {0.5}


def test_speedup_is_plotted_against_sparsity_with_dense_speed_as_reference():
    frame = pd.DataFrame([("m", method, s, "cpu", 10.0, 10.0 * (1 + s), 1 + s, 1 + 2 * s, 1 - s, 16, 16, 1e-6,
                           12.0, 10.0 * (1 + s) / 12.0 if method == "teal" else float("nan"),
                           14.0, 10.0 * (1 + s) / 14.0 if method == "teal" else float("nan"),
                           10.0 * (1 + s) / 14.0 if method == "teal" else 1 + s, 30.0, 16,
                           *((20.0, 20.0 * (1 + 1.2 * s), 1 + 1.2 * s, 40.0, 1e-7) if method == "teal" else [float("nan")] * 5))
                          for method in ("cats", "teal") for s in (0.7, 0.5)], columns=list(columns.SPEED))
    figure = figures.speedup(frame)
    assert_labelled(figure)
    (ax,) = figure.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["teal"].get_xdata()) == [0.5, 0.7] and lines["teal"].get_ydata() == pytest.approx([1.5, 1.7])
    assert lines["teal bound"].get_ydata() == pytest.approx([2.0, 2.4])
    assert lines["teal bound"].get_color() == lines["teal"].get_color() != lines["cats"].get_color()
    assert lines["teal over full-activity kernels"].get_ydata() == pytest.approx([1.25, 17 / 12])
    assert lines["teal over dense on the kernels' engine"].get_ydata() == pytest.approx([15 / 14, 17 / 14])
    assert lines["teal over dense on the kernels' engine"].get_linestyle() == "-."
    assert "cats over full-activity kernels" not in lines  # an older result without the measurements
    assert "cats over dense on the kernels' engine" not in lines
    assert lines["teal compiled step"].get_ydata() == pytest.approx([1.6, 1.84]) and "cats compiled step" not in lines


def test_table_ii_is_plotted_as_the_mean_match_rate_over_samples_per_layer_and_strategy():
    rows = [("m", strategy, metric, layer, sample, *RNG.uniform(0, 1, 2))
            for strategy in ("replace", "insert") for metric in ("jaccard", "paper_match_rate")
            for layer in (0, 2) for sample in range(3)]
    table_ii = pd.DataFrame(rows, columns=[*columns.TABLE_II_KEYS, "0.95", "0.70"])
    figure = figures.match_rates(table_ii)
    assert_labelled(figure)
    assert sorted(ax.get_title() for ax in figure.axes) == ["m: jaccard", "m: paper_match_rate"]
    (line,) = [line for line in panel(figure, "m: jaccard").get_lines() if line.get_label() == "insert, layer 2"]
    chosen = table_ii[(table_ii.strategy == "insert") & (table_ii.metric == "jaccard") & (table_ii.layer == 2)]
    assert list(line.get_xdata()) == [0.70, 0.95]
    assert line.get_ydata() == pytest.approx([chosen["0.70"].mean(), chosen["0.95"].mean()])


def test_natural_sparsity_is_on_a_log_axis_and_says_when_there_are_no_zeros(tmp_path):
    rows = [("relu", layer, component, zeros) for layer in range(4) for component, zeros in
            (("act", 0.5 * (layer + 1) / 4), ("h", 1e-5 if layer else 0.0))]
    rows += [("swiglu", layer, "act", 0.0) for layer in range(4)]
    frame = pd.DataFrame(rows, columns=["model", "layer", "component", "zero_fraction"])
    figure = plot_natural_sparsity(frame, [tmp_path / "natural.png"])
    relu, swiglu = figure.axes
    assert relu.get_yscale() == "log" and "no zeros in 1 layers" in relu.get_legend().get_texts()[1].get_text()
    (line,) = [line for line in relu.get_lines() if line.get_label() == "act"]
    assert line.get_ydata() == pytest.approx([12.5, 25, 37.5, 50])
    assert any("no exact zeros" in text.get_text() for text in swiglu.texts)
    assert (tmp_path / "natural.png").read_bytes().startswith(b"\x89PNG")


def test_a_figure_is_drawn_from_its_tables_csv_as_png_and_pdf(tmp_path):
    frame, _ = downstream_example()
    (tmp_path / "downstream.csv").write_text(frame.to_csv(index=False))
    figures.draw("downstream", [tmp_path / "downstream.csv"], tmp_path / "downstream.png")
    assert (tmp_path / "downstream.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "downstream.pdf").read_bytes().startswith(b"%PDF")


def test_figures_are_drawn_only_from_published_tables():
    targeted = ["results/tables/downstream.csv", "results/tables/pattern_match_table_ii.csv"]
    assert publish.drawn(targeted) == ["layer_sparsity", "downstream", "pattern_match"]
    assert "speed" in publish.drawn([*targeted, "results/tables/speed.csv"])


def test_heatmaps_have_a_colour_key_and_state_which_neurons_they_show(tmp_path):
    tile = RNG.random(pattern_study.TILE) < 0.4
    table = pd.DataFrame({"strategy": "token", "similarity": 0.7, "metric": pattern_study.RANKING_METRIC,
                          "sample": [0, 1], "layer": 0, "match_rate": [0.9, 0.5]})
    tiles = {("token", sample): [(tile, ~tile), (tile, tile)] for sample in (0, 1)}
    study = pattern_study.MatchStudy(table, [0, 64], [0, 2], tiles, {})
    figure = pattern_study.plot_heatmaps(study, "token", tmp_path / "heatmaps.png")
    (key,) = figure.legends
    assert [t.get_text() for t in key.get_texts()] == ["active neuron", "inactive neuron"]
    assert "the first 64 tokens and FFN neurons 0-63 of each layer" in figure.get_suptitle()
    titles = [ax.get_title() for ax in figure.axes]
    assert "best (sample 0), layer 2\n70% variant: 100.0% match" in titles
    assert (tmp_path / "heatmaps.png").read_bytes().startswith(b"\x89PNG")
