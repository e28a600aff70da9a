"""The pattern study on a tiny model: samples, variants, active neurons, tables and figures."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch

from actsparse import corpora, hooks, methods, models, pattern_study, stages
from actsparse.patterns import paper_layers
from conftest import REPO

LENGTH = 64


@pytest.fixture(scope="module")
def text() -> str:
    with gzip.open(REPO / "resources/data/wikitext-2-raw/wiki.test.raw.gz", "rt", encoding="utf-8") as f:
        return f.read(6000)


@pytest.fixture(scope="module")
def study_inputs(tiny_model_dir, tmp_path_factory, text):
    """An imported tiny llama, its evaluation and calibration corpora, and cats thresholds at 0.5
    fitted here as the per-layer median of |act| on the calibration text."""
    model_dir = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("patterns")
    tokenizer = models.load_tokenizer(model_dir)
    paths = {}
    for name, part in (("calibration", text[:3000]), ("evaluation", text[3000:])):
        paths[name] = root / f"{name}.safetensors"
        corpora.save_corpus(paths[name], corpora.tokenize(part, tokenizer), {"source": name})
    model, _ = models.load_model(model_dir)
    acts: dict[int, list[torch.Tensor]] = {}
    ids = corpora.load_corpus(paths["calibration"])["input_ids"][None, :512]
    with hooks.capture(model, ["act"], lambda layer, _, value: acts.setdefault(layer, []).append(value)):
        with torch.no_grad():
            model(ids)
    thresholds = {(layer, "act"): float(torch.cat(v).abs().median()) for layer, v in acts.items()}
    paths["thresholds"] = root / "cats-0.50.safetensors"
    methods.save_thresholds(paths["thresholds"], thresholds, {"method": "cats", "target_sparsity": 0.5})
    return model_dir, paths, root


def test_samples_are_seeded_disjoint_windows_of_the_corpus():
    tokens = list(range(1000))
    chosen = pattern_study.choose_samples(tokens, 5, 100, seed=3)
    assert chosen == pattern_study.choose_samples(tokens, 5, 100, seed=3)
    assert chosen != pattern_study.choose_samples(tokens, 5, 100, seed=4)
    starts = [start for start, _ in chosen]
    assert starts == sorted(starts) and all(s % 100 == 0 for s in starts) and len(set(starts)) == 5
    for start, ids in chosen:
        assert ids == tokens[start : start + 100]
    with pytest.raises(ValueError, match="fewer than patterns.samples x patterns.length"):
        pattern_study.choose_samples(tokens, 11, 100, seed=0)


def test_word_edits_swap_corpus_words_of_equal_token_count(text):
    tokenizer = models.byte_tokenizer()
    ids = tokenizer(text[:2000], add_special_tokens=False)["input_ids"]
    editor = pattern_study.Editor(tokenizer, ids, (0.9, 0.7), vocab_size=len(tokenizer))
    edits = editor.edits(ids[500:800], "word", np.random.default_rng(0))
    original = tokenizer.decode(edits.original)
    words = original.split()
    for nominal, variant_ids in edits.variants:
        variant = tokenizer.decode(variant_ids)
        new_words = variant.split()
        # the byte tokenizer spends one token per byte: equal token counts keep every position aligned
        assert len(variant_ids) == len(edits.original)
        assert [len(w) for w in new_words] == [len(w) for w in words]
        changed = [(a, b) for a, b in zip(words, new_words) if a != b]
        assert len(changed) == round((1 - nominal) * len(words))
        assert all(b in editor.pool for _, b in changed)


def test_active_neurons_are_the_nonzero_down_inputs_of_a_manual_ffn(study_inputs):
    model_dir, paths, _ = study_inputs
    model, tokenizer = models.load_model(model_dir)
    thresholds, _ = methods.load_thresholds(paths["thresholds"])
    ids = corpora.load_corpus(paths["evaluation"])["input_ids"][:40].tolist()
    inputs = {}
    manual = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0][0, 1:]))
              for i, layer in enumerate(model.model.layers)]
    with stages.sparsified(model, [paths["thresholds"]], "all"):
        found, hidden = pattern_study.active_neurons(model, ids, models.bos_id(tokenizer), hidden_layer=1)
    for handle in manual:
        handle.remove()
    for i, layer in enumerate(model.model.layers):
        x = inputs[i]
        with torch.no_grad():
            act, up = layer.mlp.act_fn(layer.mlp.gate_proj(x)), layer.mlp.up_proj(x)
        expected = (act.abs() >= thresholds[i, "act"].float()) & (act != 0) & (up != 0)
        assert np.array_equal(found[i], expected.numpy())
        assert 0.3 < found[i].mean() < 0.7  # thresholds at the calibration median
    assert np.array_equal(hidden, inputs[1].numpy())  # what layer 1's FFN read


@pytest.fixture(scope="module")
def match_run(study_inputs):
    """The match study of 3 samples; similarity 1.0 makes variants identical to their original."""
    model_dir, paths, root = study_inputs
    pattern_study.run_match_study(
        model_dir, paths["evaluation"], paths["thresholds"], root / "match.csv", root / "match.json",
        [root / "heatmaps_token.png", root / "heatmaps_word.png"],
        samples=3, length=LENGTH, strategies=["token", "word"], similarities=[1.0, 0.9, 0.7], hot_fraction=0.5,
        seed=0, dtype="float32", device="cpu", provenance={"seed": 0},
    )
    return root


@pytest.fixture(scope="module")
def predictor_run(study_inputs):
    model_dir, paths, root = study_inputs
    config = dict(source_layer=0, target_layers=None, hidden=32, epochs=5, budgets=[0.5, 1.0],
                  train_tokens=1024, eval_tokens=256)
    pattern_study.run_predictor_study(
        model_dir, paths["calibration"], paths["evaluation"], paths["thresholds"], root / "predictor.csv",
        root / "prefetch.csv", root / "predictor.json", root / "prefetch.png", window=LENGTH, predictor=config,
        seed=0, dtype="float32", device="cpu", provenance={},
    )
    return root


def test_match_study_writes_the_tables_and_figures(match_run):
    root = match_run
    table = pd.read_csv(root / "match.csv")
    assert tuple(table.columns) == pattern_study.MATCH
    assert set(table.metric) == {"token_aligned_agreement", "hot_neuron_jaccard", "paper_match_rate"}
    assert len(table) == 3 * 2 * 3 * 3 * 3  # samples x strategies x similarities x layers x metrics
    identical = table[table.similarity == 1.0]
    assert (identical.match_rate == 1.0).all() and (identical.measured_similarity == 1.0).all()
    token = table[(table.strategy == "token") & (table.similarity < 1.0)]
    edits = np.floor((1 - token.similarity) * LENGTH + 0.5)
    assert np.allclose(token.measured_similarity, 1 - edits / LENGTH)
    assert (table[table.similarity == 0.7].match_rate < 1.0).any()  # edits do move the patterns
    for figure in (root / "heatmaps_token.png", root / "heatmaps_word.png"):
        assert figure.read_bytes()[:4] == b"\x89PNG" and figure.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
    summary = json.loads((root / "match.json").read_text())
    assert summary["method"] == "cats" and summary["provenance"] == {"seed": 0}
    assert 0.3 < summary["achieved_sparsity"] < 0.7
    assert [s["sample"] for s in summary["samples"]] == [0, 1, 2]
    assert set(summary["ranked_at_lowest_similarity"]) == {"token", "word"}


def test_predictor_study_writes_one_row_per_predictor_and_target(predictor_run):
    root = predictor_run
    quality = pd.read_csv(root / "predictor.csv")
    assert tuple(quality.columns) == pattern_study.PREDICTOR
    assert sorted(zip(quality.features, quality.target_layer)) == [
        (f, t) for f in ("frequency", "hidden_state", "pattern") for t in (1, 2)
    ]
    assert quality[["precision", "recall", "f1"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (quality.eval_tokens == 256).all() and (quality.train_tokens <= 1024).all()
    prefetch = pd.read_csv(root / "prefetch.csv")
    assert tuple(prefetch.columns) == pattern_study.PREFETCH
    full = prefetch[prefetch.budget_fraction == 1.0]
    assert (full.recall == 1.0).all() and (full.bytes_fetched == full.dense_bytes).all()
    # one neuron's gate row, up row and down column, float32, hidden size 64
    assert json.loads((root / "predictor.json").read_text())["bytes_per_neuron"] == 3 * 64 * 4
    assert (root / "prefetch.png").is_file() and (root / "prefetch.pdf").is_file()


def test_target_layers_default_to_the_paper_layers_past_the_source():
    assert pattern_study.target_layers(30, 0, None) == [10, 20, 29]
    assert pattern_study.target_layers(30, 12, None) == [20, 29]
    assert pattern_study.target_layers(30, 0, [5, 3]) == [3, 5]
    with pytest.raises(ValueError, match="target_layers"):
        pattern_study.target_layers(30, 5, [5])
    with pytest.raises(ValueError, match="source_layer"):
        pattern_study.target_layers(30, 29, None)


def test_tables_gather_models_and_pivot_like_table_ii(match_run, predictor_run, tmp_path):
    root = match_run
    inputs = {}
    for name in ("match", "predictor", "prefetch"):
        frame = pd.read_csv(root / f"{name}.csv")
        inputs[name] = [root / f"{name}.csv", tmp_path / f"{name}-b.csv"]
        frame.assign(model="other").to_csv(inputs[name][1], index=False)
    outs = {name: tmp_path / f"{name}.csv" for name in ("match", "table_ii", "predictor", "prefetch")}
    pattern_study.pattern_tables(inputs["match"], inputs["predictor"], inputs["prefetch"], *outs.values())
    first = {name: path.read_bytes() for name, path in outs.items()}
    pattern_study.pattern_tables(inputs["match"][::-1], inputs["predictor"][::-1], inputs["prefetch"][::-1],
                                 *outs.values())
    assert {name: path.read_bytes() for name, path in outs.items()} == first  # input order does not matter
    pivot = pd.read_csv(outs["table_ii"])
    assert list(pivot.columns) == ["model", "strategy", "metric", "layer", "sample", "1.00", "0.90", "0.70"]
    assert sorted(set(pivot.layer)) == paper_layers(3)
    assert len(pivot) == 2 * 2 * 3 * 3 * 3  # models x strategies x metrics x layers x samples
    match = pd.read_csv(outs["match"])
    row = match[(match.model == "other") & (match.strategy == "word") & (match["sample"] == 1)
                & (match.similarity == 0.7) & (match.layer == 2) & (match.metric == "paper_match_rate")]
    cell = pivot[(pivot.model == "other") & (pivot.strategy == "word") & (pivot.metric == "paper_match_rate")
                 & (pivot.layer == 2) & (pivot["sample"] == 1)]["0.70"]
    assert cell.item() == row.match_rate.item()
    assert set(pd.read_csv(outs["predictor"]).model) == {"llama", "other"}
