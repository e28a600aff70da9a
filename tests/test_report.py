"""The final aggregation stage without Snakemake: paper layouts, renderings, sidecars, provenance."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY, patch

import jinja2
import numpy as np
import pandas as pd
import pytest
import torch
from docutils.core import publish_parts
from safetensors import safe_open

from actsparse import columns, formats, publish, tables, views
from actsparse.anatomy import model_summary
from actsparse.models import load_model
from actsparse.provenance import CHECKSUM, provenance
from actsparse.tasks import Doc, summarize
from conftest import FAMILIES, REPO

BOOKTABS = (r"\toprule", r"\midrule", r"\bottomrule")
UNESCAPED_SPECIAL = re.compile(r"(?<!\\)[_%&#$^~]")


def assert_booktabs(tex: str, n_columns: int) -> None:
    """A well-formed booktabs tabular: begin and end, the three rules in their places, as many
    cells in every row as the column spec names, LaTeX's special characters escaped, braces
    balanced. (What LaTeX would reject in a table of plain text cells.)"""
    lines = tex.strip().splitlines()
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", lines[0])
    assert spec, f"not a tabular: {lines[0]}"
    assert len(spec.group(1)) == n_columns, spec.group(1)
    assert lines[-1] == r"\end{tabular}"
    assert [lines[1], lines[3], lines[-2]] == list(BOOKTABS), "rules misplaced"
    assert sum(line in BOOKTABS for line in lines) == 3
    for row in [lines[2]] + lines[4:-2]:
        assert row.endswith(r" \\"), row
        cells = re.split(r"(?<!\\)&", row[:-3])
        assert len(cells) == n_columns, row
        assert not any(UNESCAPED_SPECIAL.search(cell) for cell in cells), row
    body = re.sub(r"\\[{}]", "", tex)
    assert body.count("{") == body.count("}"), "unbalanced braces"


SPECIALS = pd.DataFrame({
    "model": ["tiny_llama", "50% & more", "#1 $x$ ~^"],
    "ppl": [12.3456789, float("nan"), 123456.7],
    "tokens": [300, 4096, 7],
})


def test_latex_is_booktabs_with_every_special_character_escaped():
    tex = formats.latex(SPECIALS)
    assert_booktabs(tex, 3)
    assert tex.startswith("\\begin{tabular}{lrr}")  # text left, numbers right
    for escaped in (r"tiny\_llama", r"50\% \& more", r"\#1 \$x\$"):
        assert escaped in tex
    assert "12.35" in tex and "123457" in tex


@pytest.mark.parametrize(
    "broken",
    [
        "\\begin{tabular}{lr}\n\\toprule\na & b \\\\\n\\midrule\nx_y & 1 \\\\\n\\bottomrule\n\\end{tabular}\n",
        "\\begin{tabular}{lr}\n\\toprule\na & b \\\\\n\\midrule\nx & 1 & 2 \\\\\n\\bottomrule\n\\end{tabular}\n",
        "\\begin{tabular}{lr}\n\\hline\na & b \\\\\n\\hline\nx & 1 \\\\\n\\hline\n\\end{tabular}\n",
    ],
    ids=["unescaped-underscore", "extra-cell", "no-booktabs"],
)
def test_the_latex_check_rejects_what_latex_would(broken):
    with pytest.raises(AssertionError):
        assert_booktabs(broken, 2)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no LaTeX installed")
def test_latex_compiles_with_booktabs(tmp_path):
    (tmp_path / "table.tex").write_text(formats.latex(SPECIALS))
    document = "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\\input{table.tex}\\end{document}\n"
    (tmp_path / "doc.tex").write_text(document)
    run = subprocess.run(["pdflatex", "-halt-on-error", "doc.tex"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:]


def test_markdown_and_html_show_the_same_cells_as_latex():
    cells = formats.cells(SPECIALS)
    assert cells.loc[0].tolist() == ["tiny_llama", "12.35", "300"]
    assert cells.loc[1, "ppl"] == "" and cells.loc[2, "ppl"] == "123457"
    lines = formats.markdown(SPECIALS).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(SPECIALS.columns)
    assert lines[1].replace(" ", "").startswith("|:-") and lines[1].rstrip().endswith(":|")  # text left, numbers right
    shown = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert shown == cells.values.tolist()
    page = formats.html_view(SPECIALS, "T", "about", provenance({"a": 1}, seed=3))
    assert '<td class="num">12.35</td>' in page and "50% &amp; more" in page and provenance({"a": 1})["config_hash"] in page


PERPLEXITY = pd.DataFrame(
    [("m", "dense", 0.0, 10.0), ("m", "cats", 0.5, 12.0), ("m", "cats", 0.7, 15.0), ("m", "chess", 0.5, 11.0),
     ("m", "chess", 0.7, 13.0)],
    columns=["model", "method", "target_sparsity", "ppl"],
)


def test_perplexity_wide_has_one_column_per_level_starting_at_the_dense_baseline():
    wide = tables.perplexity_wide(PERPLEXITY)
    assert list(wide.columns) == ["model", "method", "0.00", "0.50", "0.70"]
    assert wide.set_index("method").loc["chess"].tolist() == ["m", 10.0, 11.0, 13.0]
    assert list(wide.method) == ["cats", "chess"]  # the baseline is every method's first column, not a row


def test_perplexity_at_budget_is_numpy_interp_along_each_curve_from_the_dense_baseline():
    frame = PERPLEXITY.assign(skipped_ffn_params=[0.0, 0.35, 0.55, 0.28, 0.45])
    table = tables.perplexity_at_budget(frame).set_index(["method", "skipped_ffn_params"])
    assert list(table.index) == [(m, b) for m in ("cats", "chess") for b in columns.BUDGETS]
    for method, skipped, ppl in (("cats", [0.0, 0.35, 0.55], [10.0, 12.0, 15.0]),
                                 ("chess", [0.0, 0.28, 0.45], [10.0, 11.0, 13.0])):
        for budget in columns.BUDGETS:
            expected = np.interp(budget, skipped, ppl) if budget <= skipped[-1] else np.nan
            assert table.loc[(method, budget), "ppl"] == pytest.approx(expected, nan_ok=True)
            assert table.loc[(method, budget), columns.ACTIVATED_FFN_PARAMS] == pytest.approx(1 - budget)
    assert np.isnan(table.loc[("chess", 0.5), "ppl"])  # past its curve: not extrapolated


def test_the_cost_figure_draws_every_method_in_both_panels(tmp_path):
    frame = PERPLEXITY.assign(skipped_ffn_params=[0.0, 0.35, 0.55, 0.28, 0.45], achieved_sparsity=[0, .5, .7, .5, .7])
    with patch.object(tables, "save_figure") as save:
        tables.plot_perplexity_at_cost(frame, tmp_path / "cost.png")
    figure = save.call_args[0][0]
    assert figure.get_suptitle()
    for ax, x in zip(figure.axes, ([1.0, 0.65, 0.45], [0.0, 0.5, 0.7])):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["cats", "chess", "dense"]
        assert lines["cats"].get_xdata().tolist() == pytest.approx(x)
        assert lines["cats"].get_ydata().tolist() == [10.0, 12.0, 15.0]
        assert list(lines["dense"].get_ydata()) == [10.0, 10.0]  # the dense model's perplexity, across
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_downstream_wide_is_the_chess_layout():
    rows = []
    for method, sparsity, skipped, accs in (("dense", 0.0, 0.0, (0.6, 0.8)), ("cats", 0.5, 0.4, (0.5, 0.7))):
        rows += [("m", method, sparsity, task, acc, 0.1, skipped) for task, acc in zip(("piqa", "boolq"), accs)]
        rows.append(("m", method, sparsity, columns.AVERAGE_TASK, sum(accs) / 2, 0.05, skipped))
    frame = pd.DataFrame(rows, columns=["model", "method", "target_sparsity", "task", "acc", "acc_stderr",
                                        "skipped_ffn_params"])
    wide = tables.downstream_wide(frame).set_index("method")
    assert list(wide.columns) == ["model", "target_sparsity", "piqa", "boolq", "average", "activated_ffn_params",
                                  "average_stderr"]
    assert wide.loc["cats", ["piqa", "boolq", "average"]].tolist() == pytest.approx([0.5, 0.7, 0.6])
    assert wide.activated_ffn_params.to_dict() == pytest.approx({"cats": 0.6, "dense": 1.0})
    assert wide.average_stderr.to_dict() == {"cats": 0.05, "dense": 0.05}


def test_downstream_acc_stderr_is_the_harness_sample_stderr_and_the_average_combines_them(tmp_path):
    hits = {"piqa": [1, 0, 1, 1, 0, 1, 1], "boolq": [0, 0, 1, 0, 1]}
    paths = []
    for task, task_hits in hits.items():
        docs = [Doc(("q", "q"), (" a", " b"), gold=0, norm_lengths=(2, 2)) for _ in task_hits]
        scored = summarize(docs, [[-1.0, -2.0] if hit else [-2.0, -1.0] for hit in task_hits])
        row = {"model": "m", "method": "cats", "target_sparsity": 0.5, "task": task, "acc": scored.acc,
               "acc_stderr": scored.acc_stderr, "acc_norm": scored.acc_norm, "n": scored.n,
               "achieved_sparsity": 0.5, "skipped_ffn_params": 0.4}
        paths.append(tmp_path / f"{task}.json")
        paths[-1].write_text(json.dumps(row))
    table = tables.downstream(paths).set_index("task")
    expected = {task: statistics.stdev(h) / math.sqrt(len(h)) for task, h in hits.items()}  # lm-eval's mean_stderr
    for task, stderr in expected.items():
        assert table.loc[task, "acc_stderr"] == pytest.approx(stderr, rel=1e-12)
    average = math.sqrt(sum(se**2 for se in expected.values())) / len(expected)
    assert table.loc[columns.AVERAGE_TASK, "acc_stderr"] == pytest.approx(average, rel=1e-12)
    assert tables.downstream_wide(table.reset_index()).average_stderr.tolist() == pytest.approx([average])


@pytest.mark.parametrize("family", FAMILIES)
def test_table_i_from_checkpoint_headers_matches_the_loaded_model(tiny_model_dir, family):
    model_dir = tiny_model_dir(family)
    facts = tables.model_facts(model_dir)
    summary = model_summary(load_model(model_dir)[0])
    assert facts == {"model": family, **{key: summary[key] for key in columns.MODELS[1:]}}


def outputs(directory: Path, name: str) -> SimpleNamespace:
    base = directory / name
    return SimpleNamespace(csv=f"{base}.csv", md=f"{base}.md", tex=f"{base}.tex", html=f"{base}.html",
                           provenance=f"{base}.provenance.json")


def test_an_earlier_table_is_published_in_every_format_with_its_provenance(tmp_path):
    (tmp_path / "perplexity.csv").write_text(PERPLEXITY.to_csv(index=False))
    out = outputs(tmp_path, "perplexity")
    stamp = provenance({"sparsities": [0.5]}, device="cpu", seed=0)
    views.render("perplexity", tmp_path / "perplexity.csv", out, "Perplexity", "One row per grid point.", stamp)
    written = {suffix: Path(getattr(out, suffix)).read_bytes() for suffix in ("md", "tex", "html", "provenance")}
    assert_booktabs(written["tex"].decode(), len(PERPLEXITY.columns))
    sidecar = json.loads(written["provenance"])
    assert sidecar["provenance"] == stamp and sidecar["rows"] == len(PERPLEXITY)
    assert "One row per grid point." in written["html"].decode()
    assert sidecar["csv_sha256"] == hashlib.sha256((tmp_path / "perplexity.csv").read_bytes()).hexdigest()
    assert not any(str(tmp_path).encode() in data for data in written.values())  # no absolute paths
    views.render("perplexity", tmp_path / "perplexity.csv", out, "Perplexity", "One row per grid point.", stamp)
    assert {s: Path(getattr(out, s)).read_bytes() for s in written} == written  # a rerun writes the same bytes


def test_a_paper_layout_is_built_into_a_csv_that_pandas_reads_back(tmp_path):
    (tmp_path / "perplexity.csv").write_text(PERPLEXITY.assign(ppl=PERPLEXITY.ppl / 3).to_csv(index=False))
    out = outputs(tmp_path, "perplexity_wide")
    built = publish.build_table("perplexity_wide", [tmp_path / "perplexity.csv"], out, "T", "about", provenance())
    read = pd.read_csv(out.csv, float_precision="round_trip")
    assert list(read.columns) == ["model", "method", "0.00", "0.50", "0.70"]
    pd.testing.assert_frame_equal(read, built)  # values exactly those of the source table
    assert read.loc[0, "0.50"] == 12.0 / 3


def test_provenance_rows_list_every_result_file(tmp_path):
    paths = []
    for name, device in (("b.json", "cuda:0"), ("a.json", "cpu")):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps({"ppl": 1.0, "provenance": provenance({"k": name}, device=device, seed=7)}))
    rows = publish.provenance_rows(paths)
    assert tuple(rows.columns) == columns.PROVENANCE
    assert [Path(f).name for f in rows.file] == ["a.json", "b.json"]
    assert rows.device.tolist() == ["cpu", "cuda:0"] and (rows.seed == 7).all()
    assert rows.config_hash.nunique() == 2 and "torch=" in rows.packages[0]


def test_every_table_has_a_category_and_a_caption_that_renders_as_rest():
    caption = jinja2.Template((REPO / "report/table.rst").read_text())
    for name, table in publish.TABLES.items():
        assert table.category and table.title, name
        text = caption.render(snakemake=SimpleNamespace(params=table, wildcards=SimpleNamespace(table=name)))
        html = publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 5})
        assert table.title in html["body"], name


WRITE_IN_A_FRESH_PROCESS = """
import sys, torch
from safetensors.torch import save
from actsparse.provenance import write_safetensors
metadata = {key: f"value of {key}" for key in "abcdefghij"}
write_safetensors(sys.argv[1], save({"b": torch.arange(3.0), "a": torch.ones(2, 2)}, metadata=metadata))
"""


def test_safetensors_are_written_with_the_same_bytes_in_every_process(tmp_path):
    # safetensors' own header order of ten metadata keys changes from process to process
    paths = [tmp_path / f"run{k}.safetensors" for k in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", WRITE_IN_A_FRESH_PROCESS, str(path)], check=True, cwd=REPO)
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(paths[0], framework="pt") as stored:
        assert stored.metadata() == {key: f"value of {key}" for key in "abcdefghij"} | {CHECKSUM: ANY}
        assert torch.equal(stored.get_tensor("a"), torch.ones(2, 2))
        assert torch.equal(stored.get_tensor("b"), torch.arange(3.0))


def test_what_the_rules_import_at_parse_time_imports_no_heavy_package():
    """rules/report.smk and rules/common.smk import these at every parse (dry runs, no-op reruns)."""
    code = ("import sys, actsparse.publish, actsparse.config; "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'transformers', 'torch', 'zarr', 'h5py') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_the_html_view_shows_bytes_and_shares_in_human_units():
    frame = pd.DataFrame({"layer": [0, 1], "bytes_fetched": [21700804608, 5_000_000], "dense_bytes": [999, 1500],
                          "achieved_sparsity": [0.789, 0.5], "zero_fraction": [0.0001, 1.0], "ppl": [12.5, 1e5]})
    shown = formats.human_cells(frame)
    assert shown.values.tolist() == [["0", "21.7 GB", "999 B", "78.9%", "0.01%", "12.5"],
                                     ["1", "5 MB", "1.5 kB", "50%", "100%", "100000"]]
    page = formats.html_view(frame, "T", "about", provenance())
    assert '<td class="num">21.7 GB</td>' in page and "21700804608" not in page
    assert formats.markdown(frame).count("21700804608") == 1  # the paper renderings keep the numbers


def html_tables(page: str) -> list[list[list[str]]]:
    """Every table of an HTML page as rows of cell texts (header row first)."""
    tables = re.findall(r"<table[^>]*>(.*?)</table>", page, re.S)
    rows = [re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S) for table in tables]
    return [[re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S) for row in table] for table in rows]


def test_a_long_table_shows_its_first_rows_and_says_so():
    frame = pd.DataFrame({"layer": range(formats.HTML_ROWS + 5)})
    page = formats.html_view(frame, "T", "about", provenance())
    assert html_tables(page)[0] == [["layer"]] + [[str(n)] for n in range(formats.HTML_ROWS)]
    assert f"First {formats.HTML_ROWS} of {formats.HTML_ROWS + 5} rows" in page
    assert "First" not in formats.html_view(frame.head(3), "T", "about", provenance())


def test_the_provenance_view_shows_what_files_share_once_and_only_their_differences():
    stamps = [provenance({"k": 1}, device="cpu", seed=0) for _ in range(3)]
    stamps[2]["packages"]["torch"] = "9.9"
    stamps[1]["device"] = "cuda:0"
    rows = pd.DataFrame([{"file": f"{n}.json", **{k: s[k] for k in columns.PROVENANCE[1:-1]},
                          "packages": " ".join(f"{a}={b}" for a, b in s["packages"].items())}
                         for n, s in enumerate(stamps)])
    page = views.provenance_view(rows)
    shared, differing = html_tables(page)
    packages = set(stamps[0]["packages"]) - {"torch"}
    assert {row[0] for row in shared[1:]} == {"config_hash", "code_version", "seed", "python"} | packages
    assert differing[0] == ["file", "device", "torch"]
    assert [row[1] for row in differing[1:]] == ["cpu", "cuda:0", "cpu"]
    assert differing[3][2] == "9.9" and page.count("numpy") == 1


def test_the_perplexity_figure_draws_the_dense_model_as_a_reference(tmp_path):
    with patch.object(tables, "save_figure") as save:
        tables.plot_perplexity(PERPLEXITY, tmp_path / "ppl.png")
    figure = save.call_args[0][0]
    (ax,) = figure.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["cats", "chess", "dense"] and figure.get_suptitle()
    assert list(lines["dense"].get_ydata()) == [10.0, 10.0]
    assert lines["chess"].get_xdata().tolist() == [0.0, 0.5, 0.7]  # each curve starts at the dense baseline
