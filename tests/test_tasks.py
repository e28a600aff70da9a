"""Tasks against hand-written harness strings, the vendored data's published counts, and a naive
one-forward-per-request scorer; metrics against hand-computed values."""

from __future__ import annotations

from functools import cache

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from actsparse import tasks
from actsparse.models import byte_tokenizer, tiny_model
from actsparse.tasks import (
    TASKS,
    Doc,
    arc_row_from_vendored,
    boolq_row_from_vendored,
    bos_prefix,
    encode_doc,
    encode_pair,
    hellaswag_rows_from_lines,
    load_task,
    make_doc,
    score_docs,
    summarize,
)

WINO_SENTENCE = "Sarah was a much better surgeon than Maria so _ always got the easier cases."
WINO_SARAH = "Sarah was a much better surgeon than Maria so Sarah"
WINO_MARIA = "Sarah was a much better surgeon than Maria so Maria"

# One record per task in the hub schema, and the (contexts, continuations, gold, acc_norm
# lengths) that the harness templates give for it, written out by hand.
HUB_CASES = {
    "arc_easy": (
        {
            "id": "e1",
            "question": "Which gas do plants absorb?",
            "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        },
        ("Question: Which gas do plants absorb?\nAnswer:",) * 3,
        (" oxygen", " carbon dioxide", " helium"),
        1,
        (6, 14, 6),
    ),
    "arc_challenge": (
        {
            "id": "c1",
            "question": "Which is a metal?",
            "choices": {"text": ["wood", "iron", "glass", "salt"], "label": ["1", "2", "3", "4"]},
            "answerKey": "2",
        },
        ("Question: Which is a metal?\nAnswer:",) * 4,
        (" wood", " iron", " glass", " salt"),
        1,
        (4, 4, 5, 4),
    ),
    "boolq": (
        {"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
        ("The sky is blue.\nQuestion: is the sky blue?\nAnswer:",) * 2,
        (" no", " yes"),
        1,
        (2, 3),
    ),
    "hellaswag": (
        {
            "ind": 4,
            "activity_label": "Removing ice from car",
            "ctx_a": "A man scrapes the window.",
            "ctx_b": "then THE man",
            "ctx": "A man scrapes the window. then THE man",
            "endings": ["wipes it. [title] Done [step] now.", "  leaves.", "sings.", "cries."],
            "source_id": "activitynet~v_x",
            "split": "val",
            "split_type": "indomain",
            "label": "1",
        },
        ("Removing ice from car: A man scrapes the window. Then the man",) * 4,
        (" wipes it.. Done now.", " leaves.", " sings.", " cries."),
        1,
        (20, 7, 6, 6),
    ),
    "openbookqa": (
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": {"text": ["puppies", "tides", "plants growing", "rocks"], "label": ["A", "B", "C", "D"]},
            "answerKey": "C",
        },
        ("The sun is responsible for",) * 4,
        (" puppies", " tides", " plants growing", " rocks"),
        2,
        (7, 5, 14, 5),
    ),
    "piqa": (
        {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
        ("Question: How do I open a jar?\nAnswer:",) * 2,
        (" Twist the lid.", " Eat the lid."),
        0,
        (14, 12),
    ),
    "sciq": (
        {
            "question": "What do plants absorb?",
            "distractor1": "oxygen",
            "distractor2": "helium",
            "distractor3": "neon",
            "correct_answer": "carbon dioxide",
            "support": "  Plants take in CO2.\n",
        },
        ("Plants take in CO2.\n\nQuestion: What do plants absorb?\nAnswer:",) * 4,
        (" oxygen", " helium", " neon", " carbon dioxide"),
        3,
        (6, 6, 4, 14),
    ),
    "winogrande": (
        {"sentence": WINO_SENTENCE, "option1": "Sarah", "option2": "Maria", "answer": "2"},
        (WINO_SARAH, WINO_MARIA),
        (" always got the easier cases.",) * 2,
        1,
        (51, 51),
    ),
}

# Sizes and gold counts stated in shared/data/README.md for the vendored splits.
VENDORED_SIZES = {
    "arc_easy": 570,
    "arc_challenge": 299,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "sciq": 1000,
    "winogrande": 1267,
}
VENDORED_GOLD_COUNTS = {
    "boolq": {0: 1237, 1: 2033},
    "hellaswag": {0: 2515, 1: 2485, 2: 2584, 3: 2458},
    "piqa": {0: 910, 1: 928},
    "sciq": {3: 1000},
    "winogrande": {0: 628, 1: 639},
}


def doc_of(case: tuple) -> Doc:
    _, contexts, continuations, gold, lengths = case
    return Doc(contexts, continuations, gold, lengths)


# ---------------------------------------------------------------- templates and sources


@pytest.mark.parametrize("name", sorted(HUB_CASES))
def test_template_gives_the_harness_strings(name):
    row = HUB_CASES[name][0]
    assert make_doc(TASKS[name], row) == doc_of(HUB_CASES[name])


def test_all_eight_tasks_are_described():
    assert sorted(TASKS) == sorted(VENDORED_SIZES) == sorted(HUB_CASES)


def test_arc_and_openbookqa_vendored_rows_normalise_to_the_hub_schema():
    release = {
        "id": "e1",
        "question": {
            "stem": "Which gas do plants absorb?",
            "choices": [
                {"text": "oxygen", "label": "A"},
                {"text": "carbon dioxide", "label": "B"},
                {"text": "helium", "label": "C"},
            ],
        },
        "answerKey": "B",
    }
    assert arc_row_from_vendored(release) == HUB_CASES["arc_easy"][0]
    obqa = arc_row_from_vendored(release, "question_stem")
    assert obqa["question_stem"] == "Which gas do plants absorb?" and "question" not in obqa


def test_boolq_vendored_row_normalises_to_super_glue():
    release = {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue."}
    row = boolq_row_from_vendored(release)
    assert row == {"question": "is the sky blue", "passage": "The sky is blue.", "label": 1}
    assert make_doc(TASKS["boolq"], row) == doc_of(HUB_CASES["boolq"])
    assert boolq_row_from_vendored({**release, "answer": False})["label"] == 0


def test_hellaswag_text_lines_keep_the_stored_context():
    lines = ["Removing ice from car: A man scrapes the window. then", "2", "a.", "b [step] c.", "d.", "e."]
    (row,) = hellaswag_rows_from_lines(lines)
    doc = make_doc(TASKS["hellaswag"], row)
    assert doc.contexts[0] == "Removing ice from car: A man scrapes the window. then"
    assert doc.continuations == (" a.", " b c.", " d.", " e.")
    assert doc.gold == 2
    with pytest.raises(ValueError, match="multiple of 6"):
        list(hellaswag_rows_from_lines(lines[:5]))
    with pytest.raises(ValueError, match="activity_label"):
        list(hellaswag_rows_from_lines(["no prefix here", *lines[1:]]))


def test_first_vendored_docs_match_the_files():
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert arc.gold == 0
    sciq = load_task("sciq", limit=1)[0]  # empty support: the context starts with the newline
    assert sciq.contexts[0] == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"
    assert sciq.continuations == (" Linnaeus", " shaw", " Scopes", " darwin") and sciq.gold == 3
    hella = load_task("hellaswag", limit=1)[0]
    assert hella.contexts[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert hella.continuations[3] == " starts pulling up roofing on a roof." and hella.gold == 3
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0
    boolq = load_task("boolq", limit=1)[0]
    assert boolq.contexts[0].startswith("All biomass goes through at least some of these steps")
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.continuations == (" no", " yes") and boolq.gold == 0
    wino = load_task("winogrande", limit=1)[0]
    assert wino.contexts == (WINO_SARAH, WINO_MARIA) and wino.gold == 1


@pytest.mark.parametrize("name", sorted(VENDORED_SIZES))
def test_every_vendored_task_loads_whole_with_valid_golds(name):
    docs = load_task(name)
    assert len(docs) == VENDORED_SIZES[name]
    assert all(0 <= d.gold < len(d.contexts) == len(d.continuations) for d in docs)
    if name in VENDORED_GOLD_COUNTS:
        counts = {g: sum(d.gold == g for d in docs) for g in VENDORED_GOLD_COUNTS[name]}
        assert counts == VENDORED_GOLD_COUNTS[name]
    assert load_task(name, limit=3) == docs[:3]


def test_hub_source_reads_the_harness_dataset_through_the_same_template(monkeypatch):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([HUB_CASES["winogrande"][0]] * 3)

    monkeypatch.setattr(tasks.datasets, "load_dataset", fake_load_dataset)
    assert load_task("winogrande", source="hub", limit=2) == [doc_of(HUB_CASES["winogrande"])] * 2
    load_task("winogrande", source="someone/winogrande-mirror")
    assert calls == [
        ("allenai/winogrande", "winogrande_xl", "validation"),
        ("someone/winogrande-mirror", "winogrande_xl", "validation"),
    ]


def test_bad_input_is_named():
    with pytest.raises(KeyError, match="unknown task"):
        load_task("mmlu")
    with pytest.raises(ValueError, match="limit"):
        load_task("piqa", limit=-1)
    bad_key = {**HUB_CASES["arc_easy"][0], "answerKey": "E"}
    with pytest.raises(ValueError, match="arc_easy: cannot apply the template"):
        make_doc(TASKS["arc_easy"], bad_key)
    with pytest.raises(ValueError, match="winogrande"):
        make_doc(TASKS["winogrande"], {**HUB_CASES["winogrande"][0], "answer": ""})
    with pytest.raises(ValueError, match="gold index 2"):
        Doc(("a", "a"), (" b", " c"), 2, (1, 1))


# ---------------------------------------------------------------- metrics


def test_acc_and_acc_norm_on_hand_made_loglikelihoods():
    docs = [
        Doc(("q", "q"), (" a", " bbbbbbbbbb"), 1, (1, 10)),  # acc wrong, acc_norm right
        Doc(("q", "q"), (" aaaaa", " bbbbb"), 0, (5, 5)),  # both right
        Doc(("q", "q"), (" aa", " bb"), 0, (2, 2)),  # both wrong
        Doc(("q", "q"), (" a", " b"), 0, (1, 1)),  # a tie goes to the first choice, as np.argmax
    ]
    lls = [[-2.0, -5.0], [-1.0, -3.0], [-4.0, -1.0], [-1.0, -1.0]]
    result = summarize(docs, lls)
    assert result.n == 4
    assert result.acc == pytest.approx(2 / 4)  # hits 0, 1, 0, 1
    assert result.acc_norm == pytest.approx(3 / 4)  # hits 1, 1, 0, 1
    # sample stderr of the mean: sqrt(sum((x - mean)^2) / (n - 1)) / sqrt(n)
    assert result.acc_stderr == pytest.approx((4 * 0.25 / 3) ** 0.5 / 2)
    assert result.acc_norm_stderr == pytest.approx(((3 * 0.0625 + 0.5625) / 3) ** 0.5 / 2)
    assert result.loglikelihoods == lls
    with pytest.raises(ValueError, match="3 log-likelihoods"):
        summarize(docs[:1], [[-1.0, -2.0, -3.0]])


# ---------------------------------------------------------------- tokenisation


def merging_tokenizer() -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    """The byte tokenizer plus merges that fuse " yes" into one token, so where the
    context/continuation boundary falls changes the continuation's tokens."""
    base = byte_tokenizer()
    vocab = dict(base.get_vocab())
    merges = [("Ġ", "y"), ("Ġy", "e"), ("Ġye", "s")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    core.decoder = base.backend_tokenizer.decoder
    return PreTrainedTokenizerFast(tokenizer_object=core), vocab


def test_encode_pair_moves_trailing_space_and_takes_the_joint_tail():
    tokenizer, vocab = merging_tokenizer()
    context_ids, continuation_ids = encode_pair(tokenizer, "Answer: ", "yes")
    assert continuation_ids == [vocab["Ġyes"]]  # not "Ġ" left in the context and "y", "e", "s"
    assert tokenizer.decode(context_ids) == "Answer:"
    assert encode_pair(tokenizer, "Answer:", " yes") == (context_ids, continuation_ids)


def test_winogrande_partial_scoring_scores_only_the_text_after_the_blank():
    tokenizer = byte_tokenizer()
    row = {"sentence": "The cup beat _ at chess.", "option1": "Al", "option2": "Bo", "answer": "1"}
    doc = make_doc(TASKS["winogrande"], row)
    requests = encode_doc(tokenizer, doc, [], max_length=512)
    assert [tokenizer.decode(ctx) for ctx, _ in requests] == ["The cup beat Al", "The cup beat Bo"]
    assert [tokenizer.decode(cont) for _, cont in requests] == [" at chess."] * 2


def test_bos_is_prepended_only_when_the_tokenizer_adds_it():
    tokenizer = byte_tokenizer()
    assert bos_prefix(tokenizer) == []
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    assert bos_prefix(tokenizer) == [256]


def test_scoring_errors_are_named():
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="batch_size"):
        score_docs(model(), tokenizer, HAND_DOCS, batch_size=0)
    with pytest.raises(ValueError, match="exceeds max_length=4"):
        encode_doc(tokenizer, Doc(("q",), (" too long",), 0, (8,)), [], max_length=4)
    with pytest.raises(ValueError, match="empty context"):
        encode_doc(tokenizer, Doc(("",), (" a",), 0, (1,)), [], max_length=16)


# ---------------------------------------------------------------- scoring against a naive reference


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Random-init attention is nearly uniform, so a position or masking bug moves scores by
    only ~1e-3; scaling queries and keys by 10 makes such bugs move them by tenths of a nat."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(10.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Gemma: scale is 1 + weight
                param.fill_(9.0)
    return model


@cache
def model(family: str = "llama") -> torch.nn.Module:
    return sharpen(tiny_model(family))


def naive_loglikelihoods(model, tokenizer, docs, bos=(), max_length=512):
    """One forward per request. For a byte tokenizer the continuation is the last
    len(bytes) tokens of context+continuation, plus the context's trailing spaces."""
    out = []
    for doc in docs:
        row = []
        for context, continuation in zip(doc.contexts, doc.continuations):
            whole = list(bos) + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            n_cont = len(continuation.encode()) + len(context) - len(context.rstrip())
            kept = whole[-(max_length + 1) :]
            logp = torch.log_softmax(model(torch.tensor([kept[:-1]])).logits[0].float(), dim=-1)
            total = 0.0
            for j in range(len(kept) - n_cont, len(kept)):
                total += logp[j - 1, kept[j]].item()
            row.append(total)
        out.append(row)
    return out


HAND_DOCS = [
    Doc(("Question: Which gas?\nAnswer:",) * 3, (" oxygen", " carbon dioxide", " he"), 1, (6, 14, 2)),
    Doc((WINO_SARAH, WINO_MARIA), (" always got the easier cases.",) * 2, 1, (51, 51)),
    Doc(("The answer is ",) * 2, ("yes", "no"), 0, (3, 2)),  # trailing space moves to the continuation
    Doc(("A much longer context that runs on for a while, " * 3,) * 2, (" x", " yz"), 0, (1, 2)),
    Doc(("Hi",), ("!",), 0, (1,)),  # a single-token continuation
]


def assert_close(fast, reference, tol=1e-5):
    assert [len(r) for r in fast] == [len(r) for r in reference]
    for got, want in zip(fast, reference):
        assert got == pytest.approx(want, abs=tol)


def loglikelihoods(model, tokenizer, docs, **options):
    return score_docs(model, tokenizer, docs, **options).loglikelihoods


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_fast_scorer_equals_one_forward_per_request(batch_size):
    tokenizer = byte_tokenizer()
    fast = loglikelihoods(model(), tokenizer, HAND_DOCS, batch_size=batch_size, device="cpu")
    assert_close(fast, naive_loglikelihoods(model(), tokenizer, HAND_DOCS))


def test_fast_scorer_left_truncates_like_the_harness():
    tokenizer = byte_tokenizer()
    fast = loglikelihoods(model(), tokenizer, HAND_DOCS, batch_size=5, max_length=40)
    assert_close(fast, naive_loglikelihoods(model(), tokenizer, HAND_DOCS, max_length=40))
    untruncated = naive_loglikelihoods(model(), tokenizer, HAND_DOCS)
    assert abs(fast[3][0] - untruncated[3][0]) > 1e-3  # the limit really cut this context


def test_fast_scorer_prepends_bos_for_tokenizers_that_add_it():
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    fast = loglikelihoods(model(), tokenizer, HAND_DOCS, batch_size=5)
    assert_close(fast, naive_loglikelihoods(model(), tokenizer, HAND_DOCS, bos=[256]))


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3", "phi", "opt", "gemma"])
def test_fast_scorer_matches_on_every_family(family):
    tokenizer = byte_tokenizer()
    fast = loglikelihoods(model(family), tokenizer, HAND_DOCS, batch_size=5)
    assert_close(fast, naive_loglikelihoods(model(family), tokenizer, HAND_DOCS))


def test_fast_scorer_keeps_sliding_windows_exact():
    """Left-padded contexts keep positions contiguous in the cache, so a window shorter than
    the inputs masks the same tokens as an unpadded forward."""
    sliding = sharpen(tiny_model("gemma"))
    sliding.config.sliding_window = 8
    tokenizer = byte_tokenizer()
    fast = loglikelihoods(sliding, tokenizer, HAND_DOCS, batch_size=5)
    assert_close(fast, naive_loglikelihoods(sliding, tokenizer, HAND_DOCS))
    assert abs(fast[0][1] - naive_loglikelihoods(model("gemma"), tokenizer, HAND_DOCS[:1])[0][1]) > 1e-3


def test_score_docs_on_vendored_docs_matches_naive_and_summarises():
    tokenizer = byte_tokenizer()
    docs = load_task("arc_easy", limit=3) + load_task("winogrande", limit=2)
    result = score_docs(model(), tokenizer, docs, batch_size=4)
    assert_close(result.loglikelihoods, naive_loglikelihoods(model(), tokenizer, docs))
    assert result == summarize(docs, result.loglikelihoods)
    assert result.n == 5
