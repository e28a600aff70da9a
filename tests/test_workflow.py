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
        "perplexity": {"window": 64, "batch_size": 4},
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
    dense = table[table.method == "dense"].iloc[0]
    assert dense.model == "tiny-llama" and dense.target_sparsity == 0 and dense.tokens == 300
    # a random byte-level model is near-uniform over its 260-token vocabulary
    assert 100 < dense.ppl < 1000


def test_rerun_with_nothing_changed_runs_no_job(finished_run):
    before = (finished_run / "results/tables/perplexity.csv").read_bytes()
    run = snakemake(finished_run, tiny_config(), "--dry-run")
    assert run.returncode == 0
    assert "Nothing to be done" in run.stdout + run.stderr
    assert (finished_run / "results/tables/perplexity.csv").read_bytes() == before


def test_changing_the_evaluation_window_reruns_perplexity_only(finished_run):
    run = snakemake(finished_run, tiny_config(perplexity={"window": 32, "batch_size": 4}), "--dry-run", "--quiet", "rules")
    out = run.stdout + run.stderr
    assert "eval_perplexity" in out and "perplexity_table" in out
    assert "import_model" not in out and "prepare_corpus" not in out


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
