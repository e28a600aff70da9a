"""Zero-shot multiple-choice scoring with lm-evaluation-harness semantics.

Every task reads its rows into the Hugging Face hub schema first (the harness templates are
written against it), whatever the source: the vendored files under ``resources/data/tasks``
(normalised here) or the hub dataset the harness names (used as it comes). One template per
task then turns a row into a :class:`Doc`, and one scorer serves all tasks.

Harness semantics kept:

* a request is ``(context, " " + choice)``; winogrande swaps the roles ("partial evaluation":
  the option completes the context up to the blank, the rest of the sentence is scored);
* the continuation's tokens are the tail of ``encode(context + continuation)`` after
  ``encode(context)``, with trailing context whitespace moved onto the continuation
  (``TemplateLM._encode_pair`` in lm_eval/api/model.py);
* ``context + continuation`` is left-truncated to ``max_length + 1`` tokens, the input being all
  but the last (``HFLM._loglikelihood_tokens``);
* ``acc`` is the argmax of summed log-likelihoods, ``acc_norm`` the argmax of sums divided by
  the character length of the harness's choice string (for winogrande that is the partial
  context, as in the harness); stderr is the sample stderr of the mean (``mean_stderr``).

Two deliberate choices:

* BOS: the harness's ``add_bos_token`` is off by default except for Gemma; newer harness
  versions defer to the tokenizer. We prepend BOS exactly when the tokenizer adds one by
  default (Gemma and Llama tokenizers do, the byte tokenizer of the tests does not).
* Log-probabilities are computed in float32 whatever the model dtype (the harness uses the
  model dtype), so bfloat16 runs rank choices less noisily.

Speed: each distinct context runs once; its KV cache is gathered for all its continuations,
which then run as a second batched forward. Contexts are left-padded so the cache has no
holes (positions stay contiguous, sliding windows stay exact) and the last context slot of
every row is a real token; the log-likelihoods equal one-forward-per-request scoring.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Cache

from actsparse import models

VENDORED_DIR = Path(__file__).resolve().parents[1] / "resources" / "data" / "tasks"
TARGET_DELIMITER = " "
_DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when the config names no context size

Row = dict


@dataclass(frozen=True)
class Doc:
    """One question: request ``i`` is ``(contexts[i], continuations[i])``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lengths: tuple[int, ...]  # acc_norm divisors: len() of the harness's choice strings

    def __post_init__(self) -> None:
        n = len(self.contexts)
        if n == 0 or len(self.continuations) != n or len(self.norm_lengths) != n:
            raise ValueError(f"a Doc needs as many contexts, continuations and lengths (>0): {self}")
        if not 0 <= self.gold < n:
            raise ValueError(f"gold index {self.gold} out of range for {n} choices: {self}")


@dataclass(frozen=True)
class HubSource:
    """Where the harness loads a task from (dataset_path, dataset_name, evaluation split)."""

    path: str
    name: str | None
    split: str


@dataclass(frozen=True)
class TaskSpec:
    """A task: its sources and the harness template, written as functions of a hub-schema row.

    ``text``/``choices``/``gold`` mirror the harness's doc_to_text/doc_to_choice/doc_to_target.
    With ``multiple_input`` (winogrande) the choices are contexts and ``text`` is the shared
    continuation.
    """

    name: str
    hub: HubSource
    read_vendored: Callable[[Path], Iterator[Row]]
    text: Callable[[Row], str]
    choices: Callable[[Row], list[str]]
    gold: Callable[[Row], int]
    multiple_input: bool = False


@dataclass(frozen=True)
class TaskResult:
    loglikelihoods: list[list[float]]  # per doc, per choice
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    n: int


# ---------------------------------------------------------------- vendored files -> hub schema


def _read_json(path: Path) -> datasets.Dataset:
    return datasets.load_dataset("json", data_files=str(path), split="train")


def _read_lines(path: Path) -> list[str]:
    return list(datasets.load_dataset("text", data_files=str(path), split="train")["text"])


def arc_row_from_vendored(row: Row, question_key: str = "question") -> Row:
    """ARC / OpenBookQA release rows nest the stem and a list of choice objects; the hub
    flattens them (``question`` for ARC, ``question_stem`` for OpenBookQA)."""
    question = row["question"]
    return {
        "id": row["id"],
        question_key: question["stem"],
        "choices": {
            "text": [c["text"] for c in question["choices"]],
            "label": [c["label"] for c in question["choices"]],
        },
        "answerKey": row["answerKey"],
    }


def boolq_row_from_vendored(row: Row) -> Row:
    """The BoolQ release has a boolean ``answer``; super_glue's boolq has ``label`` 0/1."""
    return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"])}


def hellaswag_rows_from_lines(lines: Sequence[str]) -> Iterator[Row]:
    """The text conversion stores 6 lines per item: ``activity_label: ctx``, gold, 4 endings.

    ctx_a/ctx_b are not recoverable, so the whole ctx goes to ``ctx_a`` and ``ctx_b`` is empty:
    the harness query ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`` then equals
    the stored line after preprocessing.
    """
    if len(lines) % 6:
        raise ValueError(f"hellaswag text has {len(lines)} lines, not a multiple of 6")
    for start in range(0, len(lines), 6):
        head, label, *endings = lines[start : start + 6]
        activity_label, sep, ctx = head.partition(": ")
        if not sep:
            raise ValueError(f"hellaswag line {start + 1} lacks the 'activity_label: ' prefix: {head!r}")
        yield {"activity_label": activity_label, "ctx_a": ctx, "ctx_b": "", "endings": endings, "label": label}


def _arc_reader(relpath: str, question_key: str) -> Callable[[Path], Iterator[Row]]:
    return lambda data_dir: (arc_row_from_vendored(r, question_key) for r in _read_json(data_dir / relpath))


def _read_piqa(data_dir: Path) -> Iterator[Row]:
    rows = _read_json(data_dir / "piqa" / "valid.jsonl.gz")
    labels = _read_lines(data_dir / "piqa" / "valid-labels.lst.gz")
    if len(rows) != len(labels):
        raise ValueError(f"piqa: {len(rows)} questions but {len(labels)} labels")
    return ({**row, "label": int(label)} for row, label in zip(rows, labels))


def _read_hellaswag(data_dir: Path) -> Iterator[Row]:
    return hellaswag_rows_from_lines(_read_lines(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2"))


def _read_boolq(data_dir: Path) -> Iterator[Row]:
    return (boolq_row_from_vendored(r) for r in _read_json(data_dir / "boolq" / "dev.jsonl.gz"))


def _json_reader(relpath: str) -> Callable[[Path], Iterator[Row]]:
    """Files already in the hub schema (SciQ, WinoGrande)."""
    return lambda data_dir: iter(_read_json(data_dir / relpath))


# ---------------------------------------------------------------- harness templates


_BRACKETED = re.compile("\\[.*?\\]")


def _hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py ``preprocess``: strip WikiHow bracket artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def _label_index(row: Row) -> int:
    """OpenBookQA's ``{{choices.label.index(answerKey.lstrip())}}``; ARC's template omits the
    lstrip, a no-op there since its keys carry no spaces."""
    return row["choices"]["label"].index(row["answerKey"].lstrip())


def _winogrande_blank(row: Row) -> int:
    return row["sentence"].index("_")


def _arc(name: str, hub_name: str, relpath: str) -> TaskSpec:
    # lm_eval/tasks/arc/arc_easy.yaml (arc_challenge.yaml includes it):
    #   doc_to_text: "Question: {{question}}\nAnswer:"
    #   doc_to_target: "{{choices.label.index(answerKey)}}"   doc_to_choice: "{{choices.text}}"
    return TaskSpec(
        name=name,
        hub=HubSource("allenai/ai2_arc", hub_name, "test"),
        read_vendored=_arc_reader(relpath, "question"),
        text=lambda d: f"Question: {d['question']}\nAnswer:",
        choices=lambda d: list(d["choices"]["text"]),
        gold=_label_index,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _arc("arc_easy", "ARC-Easy", "arc_easy/ARC-Easy-Dev.jsonl.gz"),
        _arc("arc_challenge", "ARC-Challenge", "arc_challenge/ARC-Challenge-Dev.jsonl.gz"),
        # lm_eval/tasks/super_glue/boolq/default.yaml:
        #   doc_to_text: "{{passage}}\nQuestion: {{question}}?\nAnswer:"
        #   doc_to_target: label   doc_to_choice: ["no", "yes"]
        TaskSpec(
            name="boolq",
            hub=HubSource("aps/super_glue", "boolq", "validation"),
            read_vendored=_read_boolq,
            text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
            choices=lambda d: ["no", "yes"],
            gold=lambda d: int(d["label"]),
        ),
        # lm_eval/tasks/hellaswag/hellaswag.yaml + utils.py process_docs:
        #   query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
        #   choices = [preprocess(e) for e in endings]   gold = int(label)
        TaskSpec(
            name="hellaswag",
            hub=HubSource("Rowan/hellaswag", None, "validation"),
            read_vendored=_read_hellaswag,
            text=lambda d: _hellaswag_preprocess(
                d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()
            ),
            choices=lambda d: [_hellaswag_preprocess(e) for e in d["endings"]],
            gold=lambda d: int(d["label"]),
        ),
        # lm_eval/tasks/openbookqa/openbookqa.yaml:
        #   doc_to_text: question_stem
        #   doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"   doc_to_choice: "{{choices.text}}"
        TaskSpec(
            name="openbookqa",
            hub=HubSource("allenai/openbookqa", "main", "test"),
            read_vendored=_arc_reader("openbookqa/dev.jsonl.gz", "question_stem"),
            text=lambda d: d["question_stem"],
            choices=lambda d: list(d["choices"]["text"]),
            gold=_label_index,
        ),
        # lm_eval/tasks/piqa/piqa.yaml:
        #   doc_to_text: "Question: {{goal}}\nAnswer:"
        #   doc_to_target: label   doc_to_choice: "{{[sol1, sol2]}}"
        TaskSpec(
            name="piqa",
            hub=HubSource("piqa", None, "validation"),
            read_vendored=_read_piqa,
            text=lambda d: f"Question: {d['goal']}\nAnswer:",
            choices=lambda d: [d["sol1"], d["sol2"]],
            gold=lambda d: int(d["label"]),
        ),
        # lm_eval/tasks/sciq/sciq.yaml:
        #   doc_to_text: "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:"
        #   doc_to_target: 3   doc_to_choice: "{{[distractor1, distractor2, distractor3, correct_answer]}}"
        TaskSpec(
            name="sciq",
            hub=HubSource("allenai/sciq", None, "test"),
            read_vendored=_json_reader("sciq/valid.json.gz"),
            text=lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
            choices=lambda d: [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
            gold=lambda d: 3,
        ),
        # lm_eval/tasks/winogrande/default.yaml + preprocess_winogrande.py:
        #   doc_to_choice: [sentence[:idx] + opt for opt in (option1, option2)]   (idx = index of "_")
        #   doc_to_target: sentence[idx + 1:].strip()   doc_to_text: {"1": 0, "2": 1}[answer]
        TaskSpec(
            name="winogrande",
            hub=HubSource("allenai/winogrande", "winogrande_xl", "validation"),
            read_vendored=_json_reader("winogrande/dev.jsonl.gz"),
            text=lambda d: d["sentence"][_winogrande_blank(d) + 1 :].strip(),
            choices=lambda d: [d["sentence"][: _winogrande_blank(d)] + opt for opt in (d["option1"], d["option2"])],
            gold=lambda d: {"1": 0, "2": 1}[d["answer"]],
            multiple_input=True,
        ),
    )
}


def make_doc(spec: TaskSpec, row: Row) -> Doc:
    """Apply the task's harness template to one hub-schema row."""
    try:
        text, choices, gold = spec.text(row), spec.choices(row), spec.gold(row)
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(f"{spec.name}: cannot apply the template to row {row!r}: {err!r}") from err
    n = len(choices)
    if spec.multiple_input:
        contexts, continuations = tuple(choices), (TARGET_DELIMITER + text,) * n
    else:
        contexts, continuations = (text,) * n, tuple(TARGET_DELIMITER + c for c in choices)
    return Doc(contexts, continuations, gold, tuple(len(c) for c in choices))


def load_task(
    name: str, source: str = "vendored", data_dir: Path | str = VENDORED_DIR, limit: int | None = None
) -> list[Doc]:
    """Docs of one task, in file order; ``limit`` keeps the first N (the harness's ``--limit``).

    ``source`` is ``"vendored"`` (the files under ``data_dir``), ``"hub"`` (the dataset the
    harness loads, on its evaluation split) or another hub id with the same schema (a mirror).
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    spec = TASKS[name]
    if source == "vendored":
        rows: Iterable[Row] = spec.read_vendored(Path(data_dir))
    else:
        path = spec.hub.path if source == "hub" else source
        rows = datasets.load_dataset(path, spec.hub.name, split=spec.hub.split)
    return [make_doc(spec, row) for row in islice(rows, limit)]


# ---------------------------------------------------------------- metrics


def _mean_stderr(hits: np.ndarray) -> float:
    """The harness's ``mean_stderr``: sample standard deviation (ddof=1) over sqrt(n)."""
    if len(hits) < 2:
        return float("nan")
    return float(np.std(hits, ddof=1) / np.sqrt(len(hits)))


def summarize(docs: Sequence[Doc], loglikelihoods: Sequence[Sequence[float]]) -> TaskResult:
    """acc / acc_norm and their stderr from per-choice log-likelihood sums (ties: first choice)."""
    if len(docs) != len(loglikelihoods):
        raise ValueError(f"{len(docs)} docs but {len(loglikelihoods)} log-likelihood lists")
    acc, acc_norm = [], []
    for doc, lls in zip(docs, loglikelihoods):
        lls = np.asarray(lls, dtype=np.float64)
        if len(lls) != len(doc.contexts):
            raise ValueError(f"{len(lls)} log-likelihoods for a doc with {len(doc.contexts)} choices")
        acc.append(float(np.argmax(lls) == doc.gold))
        acc_norm.append(float(np.argmax(lls / np.asarray(doc.norm_lengths)) == doc.gold))
    acc_arr, norm_arr = np.asarray(acc), np.asarray(acc_norm)
    return TaskResult(
        loglikelihoods=[list(map(float, lls)) for lls in loglikelihoods],
        acc=float(acc_arr.mean()) if len(acc_arr) else float("nan"),
        acc_stderr=_mean_stderr(acc_arr),
        acc_norm=float(norm_arr.mean()) if len(norm_arr) else float("nan"),
        acc_norm_stderr=_mean_stderr(norm_arr),
        n=len(docs),
    )


# ---------------------------------------------------------------- tokenisation

Tokens = tuple[int, ...]


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer adds BOS by default, else ``[]`` (see the module docstring);
    the id is ``models.bos_id``'s, the one every stage uses."""
    if tokenizer.bos_token_id is None:
        return []
    bos = models.bos_id(tokenizer)
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_specials[:1] == [bos] and plain[:1] != [bos] else []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's ``_encode_pair``: continuation tokens are the tail of the joint encoding,
    so merges across the boundary are tokenised as the model would see them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids, whole_ids = tokenizer([context, context + continuation], add_special_tokens=False)["input_ids"]
    return context_ids, whole_ids[len(context_ids) :]


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[Tokens, Tokens]:
    """Keep the last ``max_length + 1`` tokens of context+continuation, as the harness does;
    the continuation must fit whole, and at least one context token always survives."""
    if not continuation:
        raise ValueError("a continuation encodes to no tokens")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={max_length}")
    if not context:
        raise ValueError("an empty context leaves nothing to predict the first continuation token from")
    keep = max_length + 1 - len(continuation)
    return tuple(context[-keep:]), tuple(continuation)


def _model_max_length(model: torch.nn.Module) -> int:
    """The harness's lookup order for the context size."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(model.config, attr, None):
            return int(getattr(model.config, attr))
    return _DEFAULT_MAX_LENGTH


def encode_doc(tokenizer, doc: Doc, bos: list[int], max_length: int) -> list[tuple[Tokens, Tokens]]:
    """(context, continuation) token ids of every choice, BOS-prefixed and truncated."""
    requests = []
    for context, continuation in zip(doc.contexts, doc.continuations):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        requests.append(truncate(bos + context_ids, continuation_ids, max_length))
    return requests


# ---------------------------------------------------------------- scoring


def _pad(seqs: Sequence[Tokens], left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and 0/1 mask; the pad id is 0, any id works since pads are masked out."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 out: sums over long continuations (PIQA, ~100 tokens) keep float32's per-token
    precision instead of losing ~1e-5 to accumulation."""
    logits = logits.float()
    return (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)).double()


def _continuation_logprobs(
    model: torch.nn.Module, continuations: Sequence[Tokens], ctx_mask: torch.Tensor, cache: Cache, device: torch.device
) -> torch.Tensor:
    """Log-likelihood of every continuation token but the first, run on top of ``cache``
    (one left-padded context row per continuation; ``ctx_mask`` marks its real slots)."""
    inputs, cont_mask = _pad([cont[:-1] for cont in continuations], left=False, device=device)
    targets, _ = _pad([cont[1:] for cont in continuations], left=False, device=device)
    # pad slots get position 0: past the context size, learned position tables (OPT) would overflow
    positions = (ctx_mask.sum(1, keepdim=True) + torch.arange(inputs.shape[1], device=device)) * cont_mask
    out = model(
        input_ids=inputs,
        attention_mask=torch.cat([ctx_mask, cont_mask], dim=1),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return (_token_logprobs(out.logits, targets) * cont_mask).sum(1)


def _score_batch(
    model: torch.nn.Module, requests: Sequence[tuple[Tokens, Tokens]], device: torch.device
) -> list[float]:
    """Summed continuation log-likelihoods: one forward over the distinct contexts (its last
    logits score each continuation's first token), one over the continuations on top of the
    context cache gathered per request."""
    contexts = list(dict.fromkeys(ctx for ctx, _ in requests))
    row_of = {ctx: i for i, ctx in enumerate(contexts)}
    rows = torch.tensor([row_of[ctx] for ctx, _ in requests], device=device)
    ctx_ids, ctx_mask = _pad(contexts, left=True, device=device)
    ctx_pos = (ctx_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True, logits_to_keep=1)
    continuations = [cont for _, cont in requests]
    first = torch.tensor([cont[:1] for cont in continuations], device=device)
    total = _token_logprobs(out.logits[rows], first).squeeze(1)
    if max(map(len, continuations)) > 1:
        cache = out.past_key_values
        cache.batch_select_indices(rows)
        total = total + _continuation_logprobs(model, continuations, ctx_mask[rows], cache, device)
    return total.tolist()


def _score_encoded(
    model: torch.nn.Module, encoded: Sequence[list[tuple[Tokens, Tokens]]], batch_size: int, device: torch.device
) -> list[list[float]]:
    """Docs run longest first: an out-of-memory error shows up at once, and similar lengths
    share a batch, wasting little padding."""
    order = sorted(range(len(encoded)), key=lambda i: -max(len(c) + len(t) for c, t in encoded[i]))
    results: list[list[float]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        scores = iter(_score_batch(model, [req for i in batch for req in encoded[i]], device))
        for i in batch:
            results[i] = [next(scores) for _ in encoded[i]]
    return results


@torch.inference_mode()
def score_docs(
    model: torch.nn.Module,
    tokenizer,
    docs: Sequence[Doc],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    max_length: int | None = None,
) -> TaskResult:
    """Score docs with whatever hooks are attached to ``model`` (it is only called forward).

    ``batch_size`` counts docs per step; ``device`` defaults to the model's; ``max_length``
    defaults to the model's context size, looked up as the harness does.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    max_length = max_length or _model_max_length(model)
    bos = bos_prefix(tokenizer)
    encoded = [encode_doc(tokenizer, doc, bos, max_length) for doc in docs]
    return summarize(docs, _score_encoded(model, encoded, batch_size, device))
