"""Parity and speed of actsparse.tasks against lm-evaluation-harness, on the same model and docs.

For each of the 8 zero-shot tasks, the first ``--limit`` docs of the vendored split are scored on
SmolLM2-135M (float32, CPU) by the harness's own evaluator (``lm_eval.evaluator.evaluate`` with
its ``HFLM`` model class wrapping the already-loaded model) and by ``actsparse.tasks.score_docs``.
Checked per task, and the script exits 1 when any check fails:

* the harness's requests (``arguments``: context and continuation strings) and gold indices equal
  the docs of ``tasks.load_task``;
* acc and acc_norm are identical (the harness's per-doc values against actsparse's);
* per-choice log-likelihoods differ by at most ``--tol`` (default 1e-4).

Printed: one table row per task with both accuracies, the largest log-likelihood difference,
examples/second of each scorer and their ratio (harness time / actsparse time, so > 1 means
actsparse is faster).

Precision. The harness runs twice on every task. At its defaults (the timed run) it takes the
log-softmax in the model dtype and sums the continuation in it: in float32 that drifts by up to
~1.5e-4 nats from a float64 forward on four-token ARC answers, more on long PIQA solutions, while
actsparse (float64 log-softmax and sums over float32 logits) stays within ~2e-5. The log-likelihood
check therefore compares against a second run with HFLM's own ``softmax_dtype="float64"`` option,
i.e. at the same precision; the table also shows the difference to the default run. acc and
acc_norm must agree with both runs.

Harness side. Task configs are the harness's installed YAML files, copied verbatim into a
temporary folder in the harness's folder layout, with only the dataset location changed:
``dataset_path: json``, ``dataset_name: null`` and ``dataset_kwargs`` (``data_files`` plus a
``cache_dir`` in the temporary folder). Helper modules the configs name (``!function``) are copied
alongside. The vendored files are in their release formats, not the hub schema the templates are
written against, so the ARC, OpenBookQA, BoolQ, PIQA and HellaSwag files are first rewritten as
hub-schema JSON Lines by the small converters below (written independently of actsparse's readers,
so a reader bug there shows up as a request mismatch); the SciQ and WinoGrande files are already in
the hub schema and are read as vendored. Each vendored folder holds one split (the evaluation
split); every split name a config declares (train/validation/test) resolves to that file:
zero-shot evaluation reads only the evaluation split (``test_split`` if declared, else
``validation_split``), the training split only feeds the few-shot sampler the harness builds and
zero-shot never draws from. The boolq and winogrande configs list only ``acc``; their harness
acc_norm is computed from the harness's own log-likelihoods and ``doc_to_choice`` strings with the
formula of ``ConfigurableTask.process_results`` (for the other tasks that computation is checked
against the harness's per-doc acc_norm).

BOS. ``HFLM(add_bos_token=None)`` (its default) defers to the tokenizer's own
``add_special_tokens`` behaviour, and ``tasks.bos_prefix`` prepends BOS exactly when the tokenizer
adds it by default: both sides agree for any tokenizer, and the script asserts it on the model's
(SmolLM2's tokenizer adds none, so neither side prepends BOS).

Timing. Both scorers run on the same docs with the same ``torch.set_num_threads(--threads)``;
model loading, dataset reading and task construction are excluded. The harness's time is one
``evaluate()`` call at its defaults (request building, tokenisation, forwards, metrics);
actsparse's is one ``score_docs`` call (tokenisation, forwards, metrics). Batch sizes differ in
unit: the harness's counts requests (choices), actsparse's counts docs. Each is timed
``--repeats`` times; the best time counts. On a machine shared with other jobs, ``--threads 1``
avoids the per-operator stalls two OpenMP threads suffer when the cores are oversubscribed.

    .venv/bin/python bench/bench_harness_parity.py [--limit 20] [--threads 2] [--tasks arc_easy,piqa]

The SmolLM2 model must have been imported first (results/models/smollm2-135m, the import_model
rule); lm-evaluation-harness comes from requirements-dev.txt (``make parity`` installs it).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import bz2  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actsparse import tasks  # noqa: E402
from actsparse.models import load_model, load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "results/models/smollm2-135m"
DATA_DIR = tasks.VENDORED_DIR

# ---------------------------------------------------------------- vendored files -> hub schema


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl(path: Path) -> Iterator[dict]:
    with _open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _lines(path: Path) -> list[str]:
    with _open(path) as f:
        return f.read().splitlines()


def _arc_rows(relpath: str, question_key: str) -> Callable[[Path], Iterator[dict]]:
    """allenai/ai2_arc and allenai/openbookqa flatten the release's nested question."""

    def rows(data_dir: Path) -> Iterator[dict]:
        for row in _jsonl(data_dir / relpath):
            choices = row["question"]["choices"]
            yield {
                "id": row["id"],
                question_key: row["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": row["answerKey"],
            }

    return rows


def _boolq_rows(data_dir: Path) -> Iterator[dict]:
    """aps/super_glue boolq: ``label`` 0 (False) / 1 (True) instead of the release's ``answer``."""
    for i, row in enumerate(_jsonl(data_dir / "boolq/dev.jsonl.gz")):
        yield {"question": row["question"], "passage": row["passage"], "idx": i, "label": 1 if row["answer"] else 0}


def _piqa_rows(data_dir: Path) -> Iterator[dict]:
    """The labels live in a separate file, one per line."""
    labels = [line for line in _lines(data_dir / "piqa/valid-labels.lst.gz") if line.strip()]
    rows = list(_jsonl(data_dir / "piqa/valid.jsonl.gz"))
    assert len(rows) == len(labels), (len(rows), len(labels))
    for row, label in zip(rows, labels):
        yield {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)}


def _hellaswag_rows(data_dir: Path) -> Iterator[dict]:
    """6 lines per item: ``activity_label: ctx``, gold, 4 endings. ctx_a/ctx_b are not recoverable:
    the whole ctx goes to ctx_a, ctx_b is empty (Rowan/hellaswag's ``label`` is a string)."""
    lines = _lines(data_dir / "hellaswag/hellaswag_val_full.txt.bz2")
    assert len(lines) % 6 == 0, len(lines)
    for start in range(0, len(lines), 6):
        head, label, *endings = lines[start : start + 6]
        activity_label, _, ctx = head.partition(": ")
        yield {"activity_label": activity_label, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": label}


@dataclass(frozen=True)
class HarnessTask:
    yaml: str  # path under lm_eval/tasks/
    helpers: tuple[str, ...] = ()  # modules the config's !function tags name, same folder
    rows: Callable[[Path], Iterator[dict]] | None = None  # converter; None: read the vendored file as is
    vendored: str | None = None  # the vendored file, when it is already in the hub schema


HARNESS_TASKS: dict[str, HarnessTask] = {
    "arc_easy": HarnessTask("arc/arc_easy.yaml", rows=_arc_rows("arc_easy/ARC-Easy-Dev.jsonl.gz", "question")),
    "arc_challenge": HarnessTask(
        "arc/arc_challenge.yaml", rows=_arc_rows("arc_challenge/ARC-Challenge-Dev.jsonl.gz", "question")
    ),
    "boolq": HarnessTask("super_glue/boolq/default.yaml", rows=_boolq_rows),
    "hellaswag": HarnessTask("hellaswag/hellaswag.yaml", helpers=("utils.py",), rows=_hellaswag_rows),
    "openbookqa": HarnessTask(
        "openbookqa/openbookqa.yaml", rows=_arc_rows("openbookqa/dev.jsonl.gz", "question_stem")
    ),
    "piqa": HarnessTask("piqa/piqa.yaml", rows=_piqa_rows),
    "sciq": HarnessTask("sciq/sciq.yaml", vendored="sciq/valid.json.gz"),
    "winogrande": HarnessTask(
        "winogrande/default.yaml", helpers=("preprocess_winogrande.py",), vendored="winogrande/dev.jsonl.gz"
    ),
}

# ---------------------------------------------------------------- harness task configs

_SPLIT_KEY = re.compile(r"^(training_split|validation_split|test_split):\s*(\S+)\s*$")
_LOCATION_KEYS = ("dataset_path:", "dataset_name:", "dataset_kwargs:")


def _declared_splits(text: str, included: str = "") -> list[str]:
    """Split names the config declares (its own keys override the included file's)."""
    splits: dict[str, str] = {}
    for source in (included, text):
        for line in source.splitlines():
            if m := _SPLIT_KEY.match(line):
                splits[m.group(1)] = m.group(2)
    return sorted({v for v in splits.values() if v not in ("null", "~")})


def relocate_config(text: str, data_file: Path, cache_dir: Path, included: str = "") -> str:
    """The harness config with only its dataset location changed (top-level keys
    dataset_path, dataset_name, dataset_kwargs); every other line is kept verbatim."""
    if any(line.startswith("dataset_kwargs:") for line in text.splitlines()):
        raise ValueError("config already has dataset_kwargs; merge them by hand")
    out = []
    for line in text.splitlines():
        if line.startswith("dataset_path:"):
            line = "dataset_path: json"
        elif line.startswith("dataset_name:"):
            line = "dataset_name: null"
        out.append(line)
    splits = _declared_splits(text, included)
    if not splits:
        raise ValueError("config declares no split")
    out += ["dataset_kwargs:", f"  cache_dir: {json.dumps(str(cache_dir))}", "  data_files:"]
    out += [f"    {split}: {json.dumps(str(data_file))}" for split in splits]
    return "\n".join(out) + "\n"


def changed_lines(original: str, relocated: str) -> list[str]:
    """Lines of ``relocated`` that are not in ``original`` (they must all be location keys)."""
    kept = set(original.splitlines())
    return [line for line in relocated.splitlines() if line not in kept]


def _included(text: str) -> str | None:
    m = re.search(r"^include:\s*(\S+)\s*$", text, re.M)
    return m.group(1) if m else None


def write_harness_tasks(names: Sequence[str], out_dir: Path, data_dir: Path = DATA_DIR) -> Path:
    """Relocated copies of the harness's configs (and their helper modules) under
    ``out_dir/tasks``, in the harness's own folder layout (so ``include:`` resolves to the
    relocated sibling), reading hub-schema files written under ``out_dir/data``."""
    import lm_eval

    harness_tasks = Path(lm_eval.__file__).parent / "tasks"
    task_dir, conv_dir, cache_dir = out_dir / "tasks", out_dir / "data", out_dir / "cache"
    for d in (task_dir, conv_dir, cache_dir):
        d.mkdir(parents=True, exist_ok=True)
    by_yaml = {spec.yaml: name for name, spec in HARNESS_TASKS.items()}
    pending, written = list(names), set()
    while pending:
        name = pending.pop(0)
        if name in written:
            continue
        written.add(name)
        spec = HARNESS_TASKS[name]
        if spec.rows is not None:
            data_file = conv_dir / f"{name}.jsonl"
            with open(data_file, "w", encoding="utf-8") as f:
                for row in spec.rows(data_dir):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            data_file = data_dir / spec.vendored
        source = harness_tasks / spec.yaml
        text = source.read_text()
        included = ""
        if inc := _included(text):
            inc_yaml = str(Path(spec.yaml).parent / inc)
            if inc_yaml not in by_yaml:
                raise ValueError(f"{name} includes {inc_yaml}, which is not one of the relocated configs")
            pending.append(by_yaml[inc_yaml])  # its relocated copy must sit next to this one
            included = (source.parent / inc).read_text()
        relocated = relocate_config(text, data_file, cache_dir, included)
        bad = [line for line in changed_lines(text, relocated) if not line.startswith((*_LOCATION_KEYS, "  "))]
        assert not bad, f"{name}: relocation changed more than the dataset location: {bad}"
        target = task_dir / spec.yaml
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(relocated)
        for helper in spec.helpers:
            shutil.copy(source.parent / helper, target.parent / helper)
    return task_dir


# ---------------------------------------------------------------- one task, both scorers


@dataclass
class TaskParity:
    task: str
    n: int
    acc_harness: float
    acc_actsparse: float
    acc_norm_harness: float
    acc_norm_actsparse: float
    max_ll_diff: float  # against the harness with float64 log-softmax (the parity check)
    max_ll_diff_default: float  # against the harness at its defaults (float32 log-softmax)
    request_mismatches: int
    gold_mismatches: int
    harness_seconds: float  # the harness at its defaults
    actsparse_seconds: float
    problems: list[str]  # disagreements found while comparing (empty when all agree)

    @property
    def harness_eps(self) -> float:
        return self.n / self.harness_seconds

    @property
    def actsparse_eps(self) -> float:
        return self.n / self.actsparse_seconds

    @property
    def ratio(self) -> float:
        return self.harness_seconds / self.actsparse_seconds

    def failures(self, tol: float) -> list[str]:
        out = list(self.problems)
        if self.request_mismatches:
            out.append(f"{self.request_mismatches} docs with different request strings")
        if self.gold_mismatches:
            out.append(f"{self.gold_mismatches} docs with a different gold index")
        if self.acc_harness != self.acc_actsparse:
            out.append(f"acc {self.acc_harness} != {self.acc_actsparse}")
        if self.acc_norm_harness != self.acc_norm_actsparse:
            out.append(f"acc_norm {self.acc_norm_harness} != {self.acc_norm_actsparse}")
        if not self.max_ll_diff <= tol:
            out.append(f"max |LL diff| {self.max_ll_diff:.2e} > {tol:g}")
        return [f"{self.task}: {msg}" for msg in out]


def _harness_gold(task, doc) -> int:
    """The gold index as ``ConfigurableTask.process_results`` derives it."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold)


@dataclass
class HarnessRun:
    task: object  # the harness's ConfigurableTask
    samples: list[dict]  # logged samples, by doc_id
    lls: list[np.ndarray]  # per doc, per choice
    acc: list[float]  # per doc
    acc_norm: list[float]  # per doc
    reported: dict[str, float]  # the harness's own aggregated metrics
    seconds: float

    def problems(self, label: str) -> list[str]:
        """The harness's aggregates must be the means of the per-doc values used here."""
        mine = {"acc": float(np.mean(self.acc)), "acc_norm": float(np.mean(self.acc_norm))}
        return [
            f"{label}: reported {metric} {value} != mean of its per-doc values {mine[metric]}"
            for metric, value in self.reported.items()
            if value != mine[metric]
        ]


def run_harness(lm, task_manager, name: str, limit: int, repeats: int = 1) -> HarnessRun:
    """The harness's evaluator on one task: per-doc log-likelihoods and acc/acc_norm, and the
    best wall time of ``evaluate`` over ``repeats``."""
    from lm_eval.evaluator import evaluate

    best, out = float("inf"), None
    for _ in range(repeats):
        task_dict = task_manager.load([name])
        start = time.perf_counter()
        out = evaluate(lm, task_dict, limit=limit, log_samples=True, bootstrap_iters=0)
        best = min(best, time.perf_counter() - start)
    task = task_dict["tasks"][name]
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls, acc, acc_norm = [], [], []
    for sample in samples:
        doc_lls = np.array([float(resp[0]) for resp in sample["filtered_resps"]])
        gold = _harness_gold(task, sample["doc"])
        # ConfigurableTask.process_results: argmax of lls, and of lls / len(choice string);
        # boolq and winogrande configs list only acc, so acc_norm is computed here the same way
        lengths = np.array([float(len(c)) for c in task.doc_to_choice(sample["doc"])])
        lls.append(doc_lls)
        acc.append(float(np.argmax(doc_lls) == gold))
        acc_norm.append(float(np.argmax(doc_lls / lengths) == gold))
        for metric, value in (("acc", acc[-1]), ("acc_norm", acc_norm[-1])):
            if metric in sample and float(sample[metric]) != value:
                raise AssertionError(f"{name} doc {sample['doc_id']}: harness {metric} {sample[metric]} != {value}")
    reported = {
        metric: float(out["results"][name][f"{metric},none"])
        for metric in ("acc", "acc_norm")
        if f"{metric},none" in out["results"][name]
    }
    return HarnessRun(task, samples, lls, acc, acc_norm, reported, best)


def run_actsparse(model, tokenizer, docs, batch_size: int, repeats: int = 1):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = tasks.score_docs(model, tokenizer, docs, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return result, best


def _max_diff(harness_lls: Sequence[np.ndarray], ours: Sequence[Sequence[float]]) -> float:
    worst = 0.0
    for h, o in zip(harness_lls, ours, strict=True):
        if len(h) != len(o):
            return float("inf")
        worst = max(worst, float(np.max(np.abs(h - np.asarray(o)))))
    return worst


def compare_task(
    name: str, lms: dict, task_manager, model, tokenizer, limit: int, batch_size: int, repeats: int = 1
) -> TaskParity:
    """``lms``: ``"default"`` (timed) and ``"float64"`` (the log-likelihood reference) HFLMs."""
    timed = run_harness(lms["default"], task_manager, name, limit, repeats)
    docs = tasks.load_task(name, "vendored", limit=limit)
    result, actsparse_s = run_actsparse(model, tokenizer, docs, batch_size, repeats)
    exact = run_harness(lms["float64"], task_manager, name, limit)
    if not len(timed.samples) == len(exact.samples) == len(docs):
        raise AssertionError(f"{name}: harness scored {len(exact.samples)} docs, actsparse {len(docs)}")
    req_bad = gold_bad = 0
    for sample, doc in zip(exact.samples, docs):
        if [tuple(args) for args in sample["arguments"]] != list(zip(doc.contexts, doc.continuations)):
            req_bad += 1
        gold_bad += _harness_gold(exact.task, sample["doc"]) != doc.gold
    problems = timed.problems("harness (defaults)") + exact.problems("harness (float64 log-softmax)")
    for metric in ("acc", "acc_norm"):  # the harness as users run it must agree too
        default, reference = float(np.mean(getattr(timed, metric))), float(np.mean(getattr(exact, metric)))
        if default != reference:
            problems.append(f"harness {metric} at its defaults {default} != with float64 log-softmax {reference}")
    return TaskParity(
        task=name,
        n=len(docs),
        acc_harness=float(np.mean(exact.acc)),
        acc_actsparse=result.acc,
        acc_norm_harness=float(np.mean(exact.acc_norm)),
        acc_norm_actsparse=result.acc_norm,
        max_ll_diff=_max_diff(exact.lls, result.loglikelihoods),
        max_ll_diff_default=_max_diff(timed.lls, result.loglikelihoods),
        request_mismatches=req_bad,
        gold_mismatches=gold_bad,
        harness_seconds=timed.seconds,
        actsparse_seconds=actsparse_s,
        problems=problems,
    )


def check_bos(lm, tokenizer) -> str:
    """Both sides prepend BOS in the same cases; returns a line saying which."""
    probe = "Question: is it?"
    harness_ids = lm.tok_encode(probe)
    ours = tasks.bos_prefix(tokenizer) + tokenizer(probe, add_special_tokens=False)["input_ids"]
    if harness_ids != ours:
        raise AssertionError(f"BOS handling differs: harness {harness_ids[:3]}..., actsparse {ours[:3]}...")
    return "BOS prepended on both sides" if tasks.bos_prefix(tokenizer) else "no BOS on either side"


def run_parity(
    model_dir: Path = MODEL_DIR,
    names: Sequence[str] = tuple(tasks.TASKS),
    limit: int = 20,
    threads: int = 2,
    batch_size: int = 8,
    harness_batch_size: int = 32,
    repeats: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[list[TaskParity], str]:
    """Score ``names`` on both sides; returns per-task parity rows and the BOS line."""
    import datasets
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir, "cpu", "float32")
    lms = {  # each with its own tokenizer copy: HFLM may set a pad token on it
        "default": HFLM(pretrained=model, tokenizer=load_tokenizer(model_dir), batch_size=harness_batch_size),
        "float64": HFLM(
            pretrained=model,
            tokenizer=load_tokenizer(model_dir),
            batch_size=harness_batch_size,
            softmax_dtype="float64",
        ),
    }
    for lm in lms.values():
        assert lm.add_bos_token is None  # the default: defer to the tokenizer
    bos_line = check_bos(lms["default"], tokenizer)
    with torch.inference_mode():  # warm-up, so the first timed task does not pay for it
        model(torch.tensor([tokenizer("warm up the kernels")["input_ids"]]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="harness_parity_") as tmp:
        task_dir = write_harness_tasks(names, Path(tmp))
        task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        for name in names:
            row = compare_task(name, lms, task_manager, model, tokenizer, limit, batch_size, repeats)
            log(
                f"  {name}: n={row.n} harness {row.harness_seconds:.1f}s, actsparse {row.actsparse_seconds:.1f}s, "
                f"max |dLL| {row.max_ll_diff:.1e} (harness defaults: {row.max_ll_diff_default:.1e})"
            )
            rows.append(row)
    return rows, bos_line


def table(rows: Sequence[TaskParity]) -> str:
    head = (
        "| task | n | acc harness | acc actsparse | acc_norm harness | acc_norm actsparse | max abs LL diff "
        "| (harness defaults) | harness ex/s | actsparse ex/s | ratio |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.n} | {r.acc_harness:.4f} | {r.acc_actsparse:.4f} | {r.acc_norm_harness:.4f} "
            f"| {r.acc_norm_actsparse:.4f} | {r.max_ll_diff:.1e} | {r.max_ll_diff_default:.1e} "
            f"| {r.harness_eps:.2f} | {r.actsparse_eps:.2f} | {r.ratio:.2f} |"
        )
    n = sum(r.n for r in rows)
    hs, ts = sum(r.harness_seconds for r in rows), sum(r.actsparse_seconds for r in rows)
    lines.append(
        f"| **all** | {n} | | | | | {max(r.max_ll_diff for r in rows):.1e} "
        f"| {max(r.max_ll_diff_default for r in rows):.1e} | {n / hs:.2f} | {n / ts:.2f} "
        f"| **{hs / ts:.2f}** |"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--limit", type=int, default=20, help="first N docs of each task")
    parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task names")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="actsparse: docs per batch")
    parser.add_argument("--harness-batch-size", type=int, default=32, help="harness: requests per batch")
    parser.add_argument("--repeats", type=int, default=1, help="time each scorer this often, keep the best")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed |log-likelihood difference|")
    args = parser.parse_args(argv)
    names = [n for n in args.tasks.split(",") if n]
    unknown = sorted(set(names) - set(HARNESS_TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {sorted(HARNESS_TASKS)}")

    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    rows, bos_line = run_parity(
        args.model, names, args.limit, args.threads, args.batch_size, args.harness_batch_size, args.repeats
    )
    load_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print()
    print(
        f"{args.model.name}, float32, CPU, {args.threads} threads; first {args.limit} docs per task; "
        f"harness batch {args.harness_batch_size} requests, actsparse batch {args.batch_size} docs; {bos_line}; "
        f"loadavg before {' '.join(load_before)}, after {' '.join(load_after)}"
    )
    print(table(rows))
    failures = [msg for row in rows for msg in row.failures(args.tol)]
    total_ratio = sum(r.harness_seconds for r in rows) / sum(r.actsparse_seconds for r in rows)
    goal = "met" if total_ratio >= 2 else "NOT met"
    print(f"\nspeed: actsparse is {total_ratio:.2f}x the harness overall (goal >= 2x: {goal})")
    if failures:
        print("PARITY FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"parity OK: identical acc and acc_norm, log-likelihoods within {args.tol:g}, same requests and golds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
