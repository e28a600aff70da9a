import json

import numpy as np
import pandas as pd
import pytest

from actsparse import columns, publish, tables
from actsparse.cli import main
from test_report import assert_booktabs

MODEL = "smollm2-135m"
METHODS = ("cats", "chess", "layer", "teal")
LEVELS = (0.5, 0.7)
TASKS = ("arc_easy", "boolq", "hellaswag", "piqa")


def write_table(results, name, frame):
    (results / "tables").mkdir(parents=True, exist_ok=True)
    frame.to_csv(results / "tables" / f"{name}.csv", index=False)


def perplexity_table(seed=0):
    rng = np.random.default_rng(seed)
    grid = [("dense", 0.0)] + [(m, s) for m in METHODS for s in LEVELS]
    frame = pd.DataFrame(grid, columns=["method", "target_sparsity"]).assign(model=MODEL)
    frame["achieved_sparsity"] = frame.target_sparsity + rng.uniform(0, 0.1, len(frame))
    frame["skipped_ffn_params"] = frame.achieved_sparsity * 0.9
    frame["ppl"] = 20 * np.exp(2 * frame.target_sparsity) + rng.uniform(0, 1, len(frame))
    frame["word_ppl"] = 2 * frame.ppl
    frame["tokens"] = 2044
    return frame[list(columns.PERPLEXITY)]


def downstream_table(seed=1):
    rng = np.random.default_rng(seed)
    grid = [("dense", 0.0, t) for t in TASKS] + [(m, s, t) for m in METHODS for s in LEVELS for t in TASKS]
    frame = pd.DataFrame(grid, columns=["method", "target_sparsity", "task"]).assign(model=MODEL)
    frame["acc"], frame["acc_norm"] = rng.uniform(0.2, 0.8, (2, len(frame)))
    frame["acc_stderr"] = 0.15
    frame["n"] = 10
    frame["achieved_sparsity"] = frame.target_sparsity + 0.1
    frame["skipped_ffn_params"] = frame.target_sparsity * 0.8
    average = frame.groupby(["model", "method", "target_sparsity"], as_index=False).mean(numeric_only=True)
    return pd.concat([frame, average.assign(task=columns.AVERAGE_TASK)])[list(columns.DOWNSTREAM)].reset_index(drop=True)


@pytest.fixture
def run(tmp_path):
    """A results directory holding the tables of a small run, as the pipeline's layouts build them."""
    results = tmp_path / "run"
    perplexity, downstream = perplexity_table(), downstream_table()
    write_table(results, "perplexity", perplexity)
    write_table(results, "perplexity_wide", tables.perplexity_wide(perplexity))
    write_table(results, "downstream", downstream)
    write_table(results, "downstream_wide", tables.downstream_wide(downstream))
    return results


def copy_run(run, path, **changed_tables):
    """``run`` copied to ``path``, with the tables named in ``changed_tables`` replaced."""
    for csv in (run / "tables").glob("*.csv"):
        write_table(path, csv.stem, changed_tables.get(csv.stem, pd.read_csv(csv)))
    return path


def compare_json(a, b, *options, capsys):
    code = main(["compare", str(a), str(b), "--format", "json", *options])
    return code, json.loads(capsys.readouterr().out)


def test_every_published_table_names_its_key_columns():
    assert set(columns.TABLE_KEYS) == set(publish.TABLES)


def test_compare_of_a_run_with_itself_is_identical(run, tmp_path, capsys):
    assert main(["compare", str(run), str(copy_run(run, tmp_path / "copy"))]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "identical (4 tables)"


def test_compare_reports_exactly_the_row_of_one_changed_perplexity(run, tmp_path, capsys):
    changed = perplexity_table()
    changed.loc[(changed.method == "teal") & (changed.target_sparsity == 0.7), "ppl"] += 1.5
    other = copy_run(run, tmp_path / "other", perplexity=changed)
    code, report = compare_json(run, other, capsys=capsys)
    assert code == 1 and report["verdict"] == "1 difference in 1 table (of 4)"
    [table] = report["tables"]
    a = perplexity_table().set_index(["method", "target_sparsity"]).loc[("teal", 0.7)]
    assert table["rows"] == [{"model": MODEL, "method": "teal", "target_sparsity": "0.70",
                              "ppl_a": a.ppl, "ppl_b": a.ppl + 1.5, "ppl_diff": pytest.approx(1.5)}]
    assert main(["compare", str(run), str(other)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "1 difference in 1 table (of 4)"


def test_compare_finds_the_cells_pandas_finds(run, tmp_path, capsys):
    """Reference: ``DataFrame.compare`` of the two tables indexed on their keys."""
    a = downstream_table()
    b = a.copy()
    rng = np.random.default_rng(7)
    for row, column in zip(rng.choice(len(b), 5, replace=False), rng.choice(["acc", "acc_norm", "n"], 5)):
        b.loc[row, column] += 1
    code, report = compare_json(run, copy_run(run, tmp_path / "b", downstream=b), "--table", "downstream", capsys=capsys)
    keys = list(columns.TABLE_KEYS["downstream"])
    expected = a.set_index(keys).compare(b.set_index(keys))
    rows = pd.DataFrame(report["tables"][0]["rows"])
    assert code == 1 and len(rows) == len(expected)
    shown = [c for c in ("acc", "acc_norm", "n") if f"{c}_a" in rows]
    reported = {(r["method"], r["target_sparsity"], r["task"], c) for r in rows.to_dict("records") for c in shown
                if r[f"{c}_a"] != r[f"{c}_b"]}
    differing = expected.xs("self", axis=1, level=1).stack().dropna().index
    assert reported == {(m, f"{s:.2f}", t, column) for _, m, s, t, column in differing}


def test_sparsity_levels_are_keys_never_paired_across_levels(run, tmp_path, capsys):
    without_07 = perplexity_table()
    without_07 = without_07[~((without_07.method == "teal") & (without_07.target_sparsity == 0.7))]
    shifted = without_07.assign(target_sparsity=without_07.target_sparsity + 1e-9)  # the same two-decimal levels
    code, report = compare_json(run, copy_run(run, tmp_path / "b", perplexity=shifted), "--table", "perplexity",
                                capsys=capsys)
    assert code == 1
    assert report["tables"][0]["rows"] == [{"model": MODEL, "method": "teal", "target_sparsity": "0.70", "only_in": "a"}]


def test_rtol_tolerates_a_small_relative_change(run, tmp_path, capsys):
    nudged = perplexity_table().assign(ppl=lambda f: f.ppl * (1 + 1e-7))
    other = copy_run(run, tmp_path / "b", perplexity=nudged)
    assert compare_json(run, other, "--rtol", "1e-6", capsys=capsys)[0] == 0
    code, report = compare_json(run, other, capsys=capsys)
    assert code == 1 and report["differences"] == len(nudged)


def test_a_table_or_column_in_one_run_only_is_a_difference(run, tmp_path, capsys):
    other = copy_run(run, tmp_path / "b", perplexity=perplexity_table().drop(columns="tokens"))
    write_table(other, "speed", pd.DataFrame({"model": [MODEL], "method": ["cats"], "sparsity": [0.5],
                                              "device": ["cpu"], "speedup": [1.3]}))
    code, report = compare_json(run, other, capsys=capsys)
    assert code == 1 and report["verdict"] == "2 differences in 2 tables (of 5)"
    assert {t["table"]: t["notes"] for t in report["tables"]} == {"perplexity": ["column tokens only in a"],
                                                                   "speed": ["table only in b"]}


def assert_fits_80_columns(out: str, names) -> None:
    """Every line within 80 characters; every column name printed whole, no header cut to `…`."""
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80
    assert "…" not in out
    words = {word for line in lines for word in line.split()}
    assert {str(n) for n in names} <= words


def test_show_and_compare_fit_80_columns(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    wide = pd.read_csv(run / "tables" / "downstream_wide.csv")
    assert main(["show", "downstream_wide", "--results", str(run)]) == 0
    out = capsys.readouterr().out
    assert_fits_80_columns(out, wide.columns)
    assert out.count("method") >= 2  # the key columns lead every block
    changed = downstream_table().assign(acc=lambda f: f.acc + 0.01, acc_norm=lambda f: f.acc_norm - 0.01, n=11)
    assert main(["compare", str(run), str(copy_run(run, tmp_path / "b", downstream=changed))]) == 1
    names = [f"{c}_{s}" for c in ("acc", "acc_norm", "n") for s in ("a", "b", "diff")]
    assert_fits_80_columns(capsys.readouterr().out, names + list(columns.TABLE_KEYS["downstream"]))


def test_show_prints_every_row(run, capsys):
    assert main(["show", "perplexity", "--results", str(run)]) == 0
    assert capsys.readouterr().out.count(MODEL) == 2 * len(perplexity_table())  # two blocks at 80 columns


def test_show_outside_a_project_names_the_results_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["show", "perplexity"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "no results under results" in err and "pass --results DIR" in err


def test_compare_of_missing_results_is_a_usage_error(run, tmp_path, capsys):
    for args in ([str(run), str(tmp_path / "missing")], [str(run), str(run), "--table", "nosuch"]):
        with pytest.raises(SystemExit) as exit:
            main(["compare", *args])
        assert exit.value.code == 2
    assert "no results under" in capsys.readouterr().err


def test_show_names_the_available_tables_when_one_is_missing(tmp_path, capsys):
    write_table(tmp_path, "downstream", pd.DataFrame({"x": [1]}))
    with pytest.raises(SystemExit):
        main(["show", "perplexity", "--results", str(tmp_path)])
    assert "available: downstream" in capsys.readouterr().err


def test_show_prints_the_markdown_or_latex_the_pipeline_writes(tmp_path, capsys):
    frame = pd.DataFrame({"model": ["m"], "method": ["chess+"], "0.50": [12.345678]})
    write_table(tmp_path, "perplexity_wide", frame)
    assert main(["show", "perplexity_wide", "--results", str(tmp_path), "--format", "latex"]) == 0
    assert_booktabs(capsys.readouterr().out, 3)
    assert main(["show", "perplexity_wide", "--results", str(tmp_path), "--format", "markdown"]) == 0
    assert "| m       | chess+   |  12.35 |" in capsys.readouterr().out
