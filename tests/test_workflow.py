"""The whole workflow on a tiny model: runs, reruns as a no-op, runs again bit for bit, publishes
every table and the report, and rejects bad config early."""

from __future__ import annotations

import hashlib
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from actsparse import columns, publish
from actsparse.anatomy import model_summary
from actsparse.cli import main
from actsparse.models import load_model
import browser
from conftest import REPO
from test_report_browser import chromium
from test_report import assert_booktabs

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]


WIKI = REPO / "resources/data/wikitext-2-raw"
# each working directory holds its own copy of the evaluation corpus, which a test may change in place
EVALUATION_COPY = "corpus/wiki.test.raw.gz"


def tiny_config(**overrides) -> dict:
    config = {
        "models": {"tiny-llama": {"tiny": {"family": "llama"}}},
        "corpora": {
            "calibration": {"path": str(WIKI / "wiki.valid.raw.gz"), "max_tokens": 512},
            "evaluation": {"path": EVALUATION_COPY, "max_tokens": 300},
        },
        "methods": {"cats": {}, "chess": {}},
        "sparsities": [0.5],
        "collection": {"shards": 2, "seq_len": 64, "batch_size": 4},
        "perplexity": {"window": 64, "batch_size": 4},
        "tasks": {"names": ["arc_easy", "winogrande"], "limit": 3, "methods": ["cats"], "sparsities": [0.5]},
        "patterns": {
            "samples": 1, "length": 64, "predictor": {"train_tokens": 256, "eval_tokens": 128, "hidden": 16, "epochs": 2},
        },
        "threads": 1,
    }
    config.update(overrides)
    return config


def write_config(workdir: Path, config: dict) -> None:
    """``config`` as the run's config.yaml, and the evaluation corpus copy tiny_config reads."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    if not (workdir / EVALUATION_COPY).exists():
        (workdir / EVALUATION_COPY).parent.mkdir(exist_ok=True)
        shutil.copy2(WIKI / "wiki.test.raw.gz", workdir / EVALUATION_COPY)


def snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    write_config(workdir, config)
    cmd = SNAKEMAKE + ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)  # a hang guard; ~2 min on an idle 2-core machine


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    run = snakemake(workdir, tiny_config())
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def test_default_target_writes_the_perplexity_table(finished_run):
    table = pd.read_csv(finished_run / "results/tables/perplexity.csv")
    assert tuple(table.columns) == columns.PERPLEXITY
    assert sorted(zip(table.method, table.target_sparsity)) == [("cats", 0.5), ("chess", 0.5), ("dense", 0.0)]
    dense = table[table.method == "dense"].iloc[0]
    assert dense.model == "tiny-llama" and dense.tokens == 300 and dense.achieved_sparsity < 0.01
    # a random byte-level model is near-uniform over its 260-token vocabulary
    assert 100 < dense.ppl < 1000
    for method in ("cats", "chess"):
        row = table[table.method == method].iloc[0]
        # thresholds fitted on calibration text give roughly the target on evaluation text
        assert 0.35 < row.achieved_sparsity < 0.65
        assert row.skipped_ffn_params > 0.2


def test_downstream_table_has_every_task_and_the_average(finished_run):
    table = pd.read_csv(finished_run / "results/tables/downstream.csv")
    assert tuple(table.columns) == columns.DOWNSTREAM
    for (method, sparsity), group in table.groupby(["method", "target_sparsity"]):
        assert list(group.task) == ["arc_easy", "winogrande", columns.AVERAGE_TASK]
        tasks = group[group.task != columns.AVERAGE_TASK]
        assert group.iloc[-1].acc == pytest.approx(tasks.acc.mean())
        assert (tasks.n == 3).all()


def test_thresholds_files_follow_the_public_layout(finished_run):
    from actsparse.methods import load_thresholds

    thresholds, metadata = load_thresholds(finished_run / "results/thresholds/tiny-llama/chess/0.50.safetensors")
    assert metadata["method"] == "chess" and metadata["target_sparsity"] == 0.5
    assert set(thresholds) == {(layer, "act") for layer in range(3)}
    assert thresholds[0, "act"].shape == (128,)  # channel-wise


def test_rerun_with_nothing_changed_runs_no_job(finished_run):
    before = (finished_run / "results/tables/perplexity.csv").read_bytes()
    run = snakemake(finished_run, tiny_config(), "--dry-run")
    assert run.returncode == 0
    assert "Nothing to be done" in run.stdout + run.stderr
    assert (finished_run / "results/tables/perplexity.csv").read_bytes() == before


def planned_jobs(workdir: Path, config: dict) -> dict[str, int]:
    """Rule -> number of jobs a dry run plans, read from Snakemake's job table."""
    run = snakemake(workdir, config, "--dry-run", "--quiet", "rules")
    assert run.returncode == 0, run.stderr[-2000:]
    counts = {}
    for line in (run.stdout + run.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


# a new perplexity table is rendered (render_table); its two layouts, the per-layer sparsity table and the
# provenance table rebuilt, and the per-layer sparsity figure redrawn
PERPLEXITY_PUBLISHED = {"perplexity_table": 1, "render_table": 1, "build_table": 4, "draw_figure": 1, "all": 1}


def test_changing_the_evaluation_window_reruns_perplexity_only(finished_run):
    jobs = planned_jobs(finished_run, tiny_config(perplexity={"window": 32, "batch_size": 4}))
    assert jobs == {"eval_perplexity": 3, **PERPLEXITY_PUBLISHED}


def test_adding_one_sparsity_level_runs_only_its_own_jobs(finished_run):
    jobs = planned_jobs(finished_run, tiny_config(sparsities=[0.5, 0.3]))
    # one new level for each of the two methods: select + evaluate, then the tables
    assert jobs == {"select_thresholds": 2, "eval_perplexity": 2, **PERPLEXITY_PUBLISHED}


def test_changing_a_method_parameter_reruns_that_method_only(finished_run):
    jobs = planned_jobs(finished_run, tiny_config(methods={"cats": {}, "chess": {"quantile_mode": "per_sample"}}))
    assert jobs == {"fit_thresholds": 1, "select_thresholds": 1, "eval_perplexity": 1, **PERPLEXITY_PUBLISHED}


def test_changing_a_corpus_file_in_place_reruns_exactly_its_dependants(finished_run):
    corpus = finished_run / EVALUATION_COPY
    original, stat = corpus.read_bytes(), corpus.stat()
    try:
        text = gzip.decompress(original).decode()
        corpus.write_bytes(gzip.compress(text.replace(" the ", " a ").encode(), mtime=0))  # same path, new text
        jobs = planned_jobs(finished_run, tiny_config())
    finally:
        corpus.write_bytes(original)
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # what reads the evaluation corpus: its preparation, the perplexity of each grid point, the
    # pattern study and the predictor's evaluation, then their tables (the perplexity table and
    # the five pattern tables rendered; the two perplexity layouts, the per-layer sparsity and the
    # provenance tables rebuilt) and figures (per-layer sparsity, Table II); calibration is untouched
    assert jobs == {
        "prepare_corpus": 1, "eval_perplexity": 3, "pattern_match": 1, "pattern_predictor": 1, "pattern_tables": 1,
        "perplexity_table": 1, "render_table": 6, "build_table": 4, "draw_figure": 2, "all": 1,
    }


# every table of the tiny run: speed is not configured
PUBLISHED = sorted(set(publish.TABLES) - {"speed"})


def test_every_table_is_published_in_every_format_with_provenance(finished_run):
    directory = finished_run / "results/tables"
    assert sorted(p.stem for p in directory.glob("*.csv")) == PUBLISHED
    for name in PUBLISHED:
        csv = directory / f"{name}.csv"
        frame = pd.read_csv(csv)
        assert len(frame) and not any(str(c).startswith("Unnamed") for c in frame.columns), name
        assert_booktabs((directory / f"{name}.tex").read_text(), len(frame.columns))
        assert (directory / f"{name}.md").read_text().count("\n") == len(frame) + 2, name  # header, rule, rows
        sidecar = json.loads((directory / f"{name}.provenance.json").read_text())
        assert sidecar["csv_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest(), name
        assert {"config_hash", "code_version", "packages", "device", "seed"} <= set(sidecar["provenance"])
        assert sidecar["provenance"]["code_version"] in (directory / f"{name}.html").read_text()


def test_the_provenance_table_lists_every_json_result_and_table(finished_run):
    table = pd.read_csv(finished_run / "results/tables/provenance.csv")
    results = finished_run / "results"
    expected = [p.relative_to(finished_run) for p in results.glob("eval/**/*.json")]
    expected += [p.relative_to(finished_run) for p in results.glob("patterns/*/*.json")]
    expected += [Path(publish.table_path(name, ".provenance.json")) for name in PUBLISHED if name != "provenance"]
    assert sorted(table.file) == sorted(map(str, expected))
    assert table.config_hash.nunique() == 1 and (table.device == "cpu").all() and (table.seed == 0).all()


def test_paper_layouts_of_the_tiny_run(finished_run):
    tables = finished_run / "results/tables"
    models = pd.read_csv(tables / "models.csv").to_dict("records")
    summary = model_summary(load_model(finished_run / "results/models/tiny-llama")[0])
    assert models == [{"model": "tiny-llama", **{key: summary[key] for key in columns.MODELS[1:]}}]
    perplexity = pd.read_csv(tables / "perplexity.csv").set_index("method")
    wide = pd.read_csv(tables / "perplexity_wide.csv").set_index("method")
    assert list(wide.columns) == ["model", "0.00", "0.50"] and list(wide.index) == ["cats", "chess"]
    assert (wide["0.00"] == perplexity.loc["dense", "ppl"]).all()
    assert wide.loc["chess", "0.50"] == perplexity.loc["chess", "ppl"]
    downstream = pd.read_csv(tables / "downstream_wide.csv")
    assert list(downstream.columns) == [*columns.DOWNSTREAM_WIDE_KEYS, "arc_easy", "winogrande", columns.AVERAGE_TASK,
                                        columns.ACTIVATED_FFN_PARAMS, columns.AVERAGE_STDERR]
    assert list(zip(downstream.method, downstream.target_sparsity)) == [("cats", 0.5), ("dense", 0.0)]
    assert 0.3 < downstream.activated_ffn_params[0] < 0.8 and downstream.activated_ffn_params[1] > 0.99


@pytest.fixture(scope="module")
def report(finished_run) -> Path:
    out = finished_run / "report.html"
    run = snakemake(finished_run, tiny_config(), "--report", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_report_builds_offline_with_every_table_and_figure(report):
    page = report.read_text()
    for name in PUBLISHED:
        assert f'"{name}.html"' in page, name
    for figure in ("perplexity", "perplexity_cost", "weights", "natural_sparsity", "activation_cdf", "layer_sparsity",
                   "downstream", "pattern_match"):
        assert f'"{figure}.png"' in page, figure
    for category in {publish.TABLES[name].category for name in PUBLISHED}:
        assert category in page, category


def test_every_table_and_figure_of_the_report_shows_in_chromium(finished_run, report):
    shown = {Path(s.path): s for s in browser.shown_results(report, chromium())}
    figures = {p.relative_to(finished_run) for p in (finished_run / "results/figures").rglob("*.png")}
    views = {Path(publish.table_path(name, ".html")) for name in PUBLISHED}
    assert set(shown) == figures | views  # none missing
    assert [str(path) for path, s in shown.items() if s.blank] == []
    assert [str(path) for path, s in shown.items() if not s.labels] == []  # the navigation names each one


# what a second run must reproduce byte for byte: thresholds and every result and table (logs and
# benchmarks hold timings)
REPRODUCED = ("thresholds", "eval", "tables", "patterns", "stats")


def test_two_fresh_runs_write_identical_bytes(finished_run, tmp_path_factory):
    again = tmp_path_factory.mktemp("workflow-again")
    run = snakemake(again, tiny_config())
    assert run.returncode == 0, run.stderr[-3000:]
    result = "results/eval/ppl/tiny-llama/dense/0.00.json"
    versions = {json.loads((d / result).read_text())["provenance"]["code_version"] for d in (finished_run, again)}
    # an edit between the runs changes every output's provenance: then nothing here is proven
    assert len(versions) == 1, f"the code changed between the two runs ({sorted(versions)}); rerun on a quiet tree"
    files = {d: sorted(p.relative_to(d) for s in REPRODUCED for p in (d / "results" / s).rglob("*") if p.is_file())
             for d in (finished_run, again)}
    assert files[finished_run] == files[again]
    assert any(p.suffix == ".safetensors" and p.parts[1] == "thresholds" for p in files[again])
    differing = [str(p) for p in files[again] if (finished_run / p).read_bytes() != (again / p).read_bytes()]
    assert differing == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"unknown_key": 1}, "unknown_key"),
        ({"perplexity": {"window": 1}}, "window"),
        ({"device": "tpu"}, "device"),
        ({"models": {"m": {"tiny": {"family": "rwkv"}}}}, "rwkv"),
        ({"methods": {"cats": {}}, "speed": {"methods": ["chess"]}}, "speed.methods"),
        ({"speed": {"methods": ["layer"]}}, "layer"),  # the layer method's masks have no sparse decode path
        ({"patterns": {"method": "layer"}}, "patterns.method"),
        ({"patterns": {"sparsity": 0.505}}, "0.505"),
    ],
)
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, overrides, message):
    run = snakemake(tmp_path, tiny_config(**overrides), "--dry-run")
    assert run.returncode != 0
    assert message in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_every_table_compared_with_itself_is_identical(finished_run, capsys):
    """Each table's key columns (columns.TABLE_KEYS) identify its rows in real tables."""
    results = str(finished_run / "results")
    names = [["--table", p.stem] for p in (finished_run / "results" / "tables").glob("*.csv")]
    assert main(["compare", results, results, *sum(names, [])]) == 0
    assert capsys.readouterr().out.startswith(f"identical ({len(names)} tables)")


@pytest.mark.slow
def test_the_grid_runs_storeless_to_the_same_thresholds_and_tables_without_a_store(finished_run, tmp_path, capsys):
    """collection.backend none: shard summaries only, fits rerun the forwards; every threshold
    tensor and every table equals the stored run's."""
    from safetensors.torch import load_file

    run = snakemake(tmp_path, tiny_config(collection={"shards": 2, "seq_len": 64, "batch_size": 4, "backend": "none"}))
    assert run.returncode == 0, run.stderr[-3000:]
    written = [p for p in (tmp_path / "results").rglob("*") if ".zarr" in p.name or ".h5" in p.name]
    assert written == []
    summaries = sorted(p.name for p in (tmp_path / "results/activations/tiny-llama/calibration").iterdir())
    assert summaries == ["shard-0.stats.safetensors", "shard-1.stats.safetensors"]
    grids = sorted(p.relative_to(finished_run) for p in finished_run.glob("results/thresholds/*/*/grid.safetensors"))
    assert len(grids) == 2
    for grid in grids:  # every level of every key, bit for bit
        stored, storeless = load_file(finished_run / grid), load_file(tmp_path / grid)
        assert stored.keys() == storeless.keys()
        assert all(torch.equal(stored[k].view(torch.int64), storeless[k].view(torch.int64)) for k in stored)
    assert main(["compare", str(finished_run / "results"), str(tmp_path / "results")]) == 0
    assert capsys.readouterr().out.startswith("identical")
