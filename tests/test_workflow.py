"""The whole workflow on a tiny model: runs, reruns as a no-op, and rejects bad config early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from actsparse import columns
from conftest import REPO

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]


def tiny_config(**overrides) -> dict:
    wiki = REPO / "resources/data/wikitext-2-raw"
    config = {
        "models": {"tiny-llama": {"tiny": {"family": "llama"}}},
        "corpora": {
            "calibration": {"path": str(wiki / "wiki.valid.raw.gz"), "max_tokens": 512},
            "evaluation": {"path": str(wiki / "wiki.test.raw.gz"), "max_tokens": 300},
        },
        "methods": {"cats": {}, "chess": {}},
        "sparsities": [0.5],
        "collection": {"shards": 2, "seq_len": 64, "batch_size": 4},
        "perplexity": {"window": 64, "batch_size": 4},
        "tasks": {"names": ["arc_easy", "winogrande"], "limit": 3, "methods": ["cats"], "sparsities": [0.5]},
        "threads": 1,
    }
    config.update(overrides)
    return config


def snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = SNAKEMAKE + ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


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


def test_changing_the_evaluation_window_reruns_perplexity_only(finished_run):
    jobs = planned_jobs(finished_run, tiny_config(perplexity={"window": 32, "batch_size": 4}))
    assert jobs == {"eval_perplexity": 3, "perplexity_table": 1, "all": 1}


def test_adding_one_sparsity_level_runs_only_its_own_jobs(finished_run):
    jobs = planned_jobs(finished_run, tiny_config(sparsities=[0.5, 0.3]))
    # one new level for each of the two methods: select + evaluate, then the table
    assert jobs == {"select_thresholds": 2, "eval_perplexity": 2, "perplexity_table": 1, "all": 1}


def test_changing_a_method_parameter_reruns_that_method_only(finished_run):
    jobs = planned_jobs(finished_run, tiny_config(methods={"cats": {}, "chess": {"quantile_mode": "per_sample"}}))
    assert jobs == {"fit_thresholds": 1, "select_thresholds": 1, "eval_perplexity": 1, "perplexity_table": 1, "all": 1}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"unknown_key": 1}, "unknown_key"),
        ({"perplexity": {"window": 1}}, "window"),
        ({"device": "tpu"}, "device"),
        ({"models": {"m": {"tiny": {"family": "rwkv"}}}}, "rwkv"),
    ],
)
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, overrides, message):
    run = snakemake(tmp_path, tiny_config(**overrides), "--dry-run")
    assert run.returncode != 0
    assert message in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()
