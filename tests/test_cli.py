import pandas as pd
import pytest

from actsparse.cli import compare_tables, main
from test_report import assert_booktabs


def write_table(results, name, frame):
    (results / "tables").mkdir(parents=True, exist_ok=True)
    frame.to_csv(results / "tables" / f"{name}.csv", index=False)


def test_compare_matches_rows_on_keys_and_subtracts_measurements():
    a = pd.DataFrame({"model": ["m", "m"], "method": ["dense", "cats"], "ppl": [10.0, 12.0]})
    b = pd.DataFrame({"model": ["m", "m"], "method": ["cats", "teal"], "ppl": [11.5, 13.0]})
    diff = compare_tables(a, b).set_index("method")
    assert diff.loc["cats", "ppl_diff"] == pytest.approx(-0.5)
    assert diff.loc["dense", "present_in"] == "left_only"
    assert diff.loc["teal", "present_in"] == "right_only"


def test_show_and_compare_print_tables(tmp_path, capsys):
    frame = pd.DataFrame({"model": ["m"], "method": ["cats"], "ppl": [12.345678]})
    write_table(tmp_path / "a", "perplexity", frame)
    write_table(tmp_path / "b", "perplexity", frame.assign(ppl=13.0))
    assert main(["show", "perplexity", "--results", str(tmp_path / "a")]) == 0
    assert "12.35" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "0.6543" in capsys.readouterr().out


def test_show_names_the_available_tables_when_one_is_missing(tmp_path):
    write_table(tmp_path, "downstream", pd.DataFrame({"x": [1]}))
    with pytest.raises(SystemExit, match="available: downstream"):
        main(["show", "perplexity", "--results", str(tmp_path)])


def test_show_prints_the_markdown_or_latex_the_pipeline_writes(tmp_path, capsys):
    frame = pd.DataFrame({"model": ["m"], "method": ["chess+"], "0.50": [12.345678]})
    write_table(tmp_path, "perplexity_wide", frame)
    assert main(["show", "perplexity_wide", "--results", str(tmp_path), "--format", "latex"]) == 0
    assert_booktabs(capsys.readouterr().out, 3)
    assert main(["show", "perplexity_wide", "--results", str(tmp_path), "--format", "markdown"]) == 0
    assert "| m       | chess+   |  12.35 |" in capsys.readouterr().out
