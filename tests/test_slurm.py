"""The pipeline's model jobs through a real one-node SLURM cluster, with config/profiles/slurm."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import yaml

from conftest import REPO
from test_workflow import tiny_config, write_config

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests/slurm/cluster.sh"
PROFILE = REPO / "config/profiles/slurm"
PARTITION = "actsparse"  # cluster.sh's only open partition; the default one refuses jobs
CANNOT_INSTALL = 3  # cluster.sh's exit status when this machine cannot install SLURM
# The dense grid point: a path every workflow version builds the same way, through the rules
# that run a model, while the default target grows with the method grid.
MODEL = next(iter(tiny_config()["models"]))
TARGET = f"results/eval/ppl/{MODEL}/dense/0.00.json"
TARGET_RULES = {"import_model", "prepare_corpus", "eval_perplexity"}
# Without slurmdbd, sacct never reports the jobs; squeue does while MinJobAge keeps them listed.
LOCAL_CLUSTER_OPTIONS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2"]
RUN_LIMIT_S = 480  # a safety net: the run takes minutes when the machine is shared


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[Path]:
    """A running one-node cluster; its directory is outside pytest's tmp tree, which munge cannot reach."""
    cluster_dir = Path(tempfile.mkdtemp(prefix="actsparse-slurm-"))
    try:
        start = subprocess.run([CLUSTER, "start", cluster_dir], capture_output=True, text=True, env=slurm_env(), timeout=600)
        if start.returncode == CANNOT_INSTALL and not os.environ.get("CI"):
            # a developer's machine without root or apt; CI must run this test, so there it fails
            pytest.skip(f"no SLURM cluster on this machine: {start.stderr.strip()}")
        assert start.returncode == 0, start.stdout + start.stderr
        yield cluster_dir
    finally:
        subprocess.run([CLUSTER, "stop", cluster_dir], check=True, env=slurm_env(), timeout=60)
        shutil.rmtree(cluster_dir)


def slurm_env() -> dict[str, str]:
    """This process's environment minus any outer SLURM job's, routed to the test partition."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_"))}
    return env | {"SBATCH_PARTITION": PARTITION}


def run_through_slurm(workdir: Path) -> subprocess.CompletedProcess:
    """TARGET via the SLURM profile; `timeout -k` because a hung status loop ignores SIGTERM."""
    write_config(workdir, tiny_config(device="cpu"))
    cmd = [
        "timeout", "-k", "10", str(RUN_LIMIT_S),
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
        "--workflow-profile", str(PROFILE), *LOCAL_CLUSTER_OPTIONS, TARGET,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=slurm_env(), timeout=RUN_LIMIT_S + 30)


def slurm_jobs() -> pd.DataFrame:
    """Every job the controller still knows: id, state, partition, memory request and the rule."""
    out = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i|%T|%P|%m|%k"],
        capture_output=True, text=True, check=True, env=slurm_env(),
    ).stdout  # fmt: skip
    rows = [line.split("|") for line in out.splitlines()]
    jobs = pd.DataFrame(rows, columns=["jobid", "state", "partition", "memory", "comment"])
    jobs["rule"] = jobs.comment.str.extract(r"^rule_(\w+?)(?:_wildcards_.*)?$", expand=False)
    return jobs


def profile_memory_mb(rule: str) -> int:
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return profile["set-resources"][rule]["mem_mb"]


def test_dense_perplexity_runs_every_job_through_sbatch(slurm_cluster, tmp_path):
    run = run_through_slurm(tmp_path)
    assert run.returncode == 0, run.stderr[-5000:]

    result = json.loads((tmp_path / TARGET).read_text())
    assert result["model"] == MODEL and result["tokens"] == 300
    assert result["ppl"] == pytest.approx(math.exp(result["nll"] / result["tokens"]))
    # a random byte-level model is near-uniform over its 260-token vocabulary
    assert 100 < result["ppl"] < 1000

    jobs = slurm_jobs()
    assert set(jobs.rule) == TARGET_RULES and len(jobs) == len(TARGET_RULES)
    assert set(jobs.state) == {"COMPLETED"} and set(jobs.partition) == {PARTITION}
    assert set(re.findall(r"submitted with SLURM jobid (\d+)", run.stderr)) == set(jobs.jobid)
    # the profile's per-rule memory reached sbatch
    import_job = jobs[jobs.rule == "import_model"].iloc[0]
    assert import_job.memory == f"{profile_memory_mb('import_model')}M"
    # every job left its SLURM log, named by its SLURM job id, where the profile puts them
    logs = {path.stem for path in (tmp_path / "results/logs/slurm").rglob("*.log")}
    assert logs == set(jobs.jobid)
