"""The pattern study on a tiny model: samples, variants, active neurons, tables and figures."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch

from actsparse import corpora, hooks, methods, models, pattern_study, patterns, stages
from actsparse.patterns import paper_layers
from conftest import REPO

LENGTH = 64
HARDWARE = {"phone": {"bandwidth_gbs": 1.0, "miss_bandwidth_gbs": 0.25, "compute_gflops": 50.0, "bytes_per_weight": 2},
            "cpu": {"bandwidth_gbs": 25.6, "miss_bandwidth_gbs": 6.4, "compute_gflops": 96.0, "bytes_per_weight": 4}}


@pytest.fixture(scope="module")
def text() -> str:
    with gzip.open(REPO / "resources/data/wikitext-2-raw/wiki.test.raw.gz", "rt", encoding="utf-8") as f:
        return f.read(6000)


def median_thresholds(model: torch.nn.Module, ids: torch.Tensor) -> dict[tuple[int, str], float]:
    """cats thresholds at 0.5: the per-layer median of |act| over ``ids``."""
    acts: dict[int, list[torch.Tensor]] = {}
    with hooks.capture(model, ["act"], lambda layer, _, value: acts.setdefault(layer, []).append(value)):
        with torch.no_grad():
            model(ids)
    return {(layer, "act"): float(torch.cat(v).abs().median()) for layer, v in acts.items()}


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
    thresholds = median_thresholds(model, corpora.load_corpus(paths["calibration"])["input_ids"][None, :512])
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
                  train_tokens=1024, eval_tokens=256, lookahead=1, rank=16, hardware=HARDWARE)
    pattern_study.run_predictor_study(
        model_dir, paths["calibration"], paths["evaluation"], paths["thresholds"], root / "predictor.csv",
        root / "prefetch.csv", root / "latency.csv", root / "predictor.json", root / "prefetch.png",
        root / "latency.png", window=LENGTH, predictor=config, hot_fraction=0.5, seed=0, dtype="float32",
        device="cpu", provenance={},
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
    assert sorted(zip(quality.features, quality.target_layer)) == sorted(
        [(f, t) for f in ("hidden_state", "pattern") for t in (1, 2)]
        + [(f, t) for f in ("frequency", "hot_set", "lookahead") for t in (0, 1, 2)]
    )
    assert quality[["precision", "recall", "f1"]].apply(lambda c: c.between(0, 1) | c.isna()).all().all()
    assert (quality.eval_tokens == 256).all() and (quality.train_tokens <= 1024).all()
    lookahead = quality[quality.features == "lookahead"].sort_values("target_layer")
    assert lookahead.source_layer.tolist() == [0, 0, 1]  # layer l reads layer l-1's input; layer 0 the embeddings
    # rank 16 on hidden size 64 predicting 128 neurons, against the FFN's 3 x 64 x 128 weights
    assert (lookahead.predictor_params == 64 * 16 + 16 + 16 * 128 + 128).all()
    assert lookahead.params_fraction.tolist() == pytest.approx([(64 * 16 + 16 + 16 * 128 + 128) / (3 * 64 * 128)] * 3)
    assert lookahead.flops_fraction.tolist() == pytest.approx([(64 * 16 + 16 * 128) / (3 * 64 * 128)] * 3)
    static = quality[quality.features.isin(["frequency", "hot_set"])]
    assert (static.source_layer == pattern_study.NO_INPUT).all() and (static.predictor_params == 0).all()
    prefetch = pd.read_csv(root / "prefetch.csv")
    assert tuple(prefetch.columns) == pattern_study.PREFETCH
    assert set(prefetch.features) == {"hidden_state", "pattern", "frequency", "lookahead", "oracle"}
    full = prefetch[prefetch.budget_fraction == 1.0]
    assert (full.recall == 1.0).all() and (full.bytes_fetched == full.dense_bytes).all()
    oracle = prefetch[prefetch.features == "oracle"]
    assert (oracle.groupby("layer").recall.max() == 1.0).all()  # half the rows hold every active one, mostly
    latency = pd.read_csv(root / "latency.csv")
    assert tuple(latency.columns) == pattern_study.LATENCY
    assert sorted(set(zip(latency.hardware, latency.features))) == [
        (h, f) for h in ("cpu", "phone") for f in ("frequency", "lookahead")]
    at_full = latency[latency.budget_fraction == 1.0]
    assert at_full.time_ms.tolist() == pytest.approx(at_full.dense_ms.tolist(), rel=1e-12)
    # one neuron's gate row, up row and down column, float32, hidden size 64
    summary = json.loads((root / "predictor.json").read_text())
    assert summary["bytes_per_neuron"] == 3 * 64 * 4 and summary["weights_per_neuron"] == 3 * 64
    for figure in ("prefetch", "latency"):
        assert (root / f"{figure}.png").is_file() and (root / f"{figure}.pdf").is_file()


def test_residual_inputs_are_what_each_decoder_layer_reads(study_inputs):
    model_dir, paths, _ = study_inputs
    model, tokenizer = models.load_model(model_dir)
    ids = corpora.load_corpus(paths["evaluation"])["input_ids"][:30].tolist()
    seen = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"])[0, 1:]),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    found = pattern_study.forward_activity(model, ids, models.bos_id(tokenizer), None, (), residual=True)
    for handle in handles:
        handle.remove()
    assert sorted(found.residual) == [0, 1, 2]
    for layer, value in seen.items():
        assert np.array_equal(found.residual[layer], value.numpy())
    assert pattern_study.lookahead_source(5, 0) == 5 and pattern_study.lookahead_source(5, 2) == 3
    assert pattern_study.lookahead_source(1, 2) == 0


def test_lookahead_zero_reads_each_layers_own_ffn_input(study_inputs, one_torch_thread):
    model_dir, paths, _ = study_inputs
    model, tokenizer = models.load_model(model_dir)
    ids = corpora.load_corpus(paths["calibration"])["input_ids"][:128].tolist()
    study = dict(window=LENGTH, source_layer=0, targets=None, hidden=4, epochs=1, budgets=[1.0], rank=4, seed=0)
    found = pattern_study.predictor_study(model, tokenizer, ids, ids, lookahead=0, **study)
    lookahead = found.predictor[found.predictor.features == "lookahead"]
    assert (lookahead.source_layer == lookahead.target_layer).all() and len(lookahead) == 3
    activity = pattern_study.gather_activity(model, ids, models.bos_id(tokenizer), LENGTH, None, [2])
    assert np.array_equal(pattern_study.lookahead_features(activity, 2, 0), activity.ffn_in[2])
    with pytest.raises(ValueError, match="lookahead must be below the model's 3 layers"):
        pattern_study.predictor_study(model, tokenizer, ids, ids, lookahead=3, **study)


def _planted(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every attention output and FFN output: the residual stream is then the token's
    embedding at every layer, so each layer's activity is a fixed function of the token, which
    a lookahead predictor can learn and a static set of neurons cannot."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def test_lookahead_predictor_reaches_near_oracle_recall_on_a_planted_rule(tiny_model_dir, text, one_torch_thread):
    model_dir = tiny_model_dir("llama")
    model, tokenizer = models.load_model(model_dir)
    ids = corpora.tokenize(text, tokenizer)["input_ids"].tolist()
    train_ids, eval_ids = ids[:2048], ids[3000:3512]
    model = _planted(model)
    thresholds = median_thresholds(model, torch.tensor([train_ids[:512]]))
    runs = []
    with hooks.apply_thresholds(model, thresholds):
        for _ in range(2):
            runs.append(pattern_study.predictor_study(
                model, tokenizer, train_ids, eval_ids, window=256, source_layer=0, targets=[1], hidden=8,
                epochs=40, budgets=[0.5, 0.6, 1.0], lookahead=1, rank=32, hot_fraction=0.5,
                hardware=[patterns.Hardware("phone", 1.0, 0.25, 50.0, 2)], seed=0,
            ))
    first, again = runs
    for name in ("predictor", "prefetch", "latency"):  # training is deterministic on CPU
        pd.testing.assert_frame_equal(getattr(first, name), getattr(again, name), check_exact=True)
    quality = first.predictor.groupby("features")[["recall", "f1"]].mean()
    assert quality.loc["lookahead", "recall"] > 0.9 and quality.loc["lookahead", "f1"] > 0.9
    assert quality.loc["frequency", "f1"] < quality.loc["lookahead", "f1"] - 0.2
    recall = first.prefetch[first.prefetch.budget_fraction == 0.6].groupby("features").recall.mean()
    assert recall["lookahead"] > 0.9 * recall["oracle"]
    latency = first.latency.set_index(["features", "budget_fraction"])
    assert latency.loc[("lookahead", 0.6), "saving_recovered"] > 0.8 > latency.loc[("frequency", 0.6), "saving_recovered"]


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
    for name in ("match", "predictor", "prefetch", "latency"):
        frame = pd.read_csv(root / f"{name}.csv")
        inputs[name] = [root / f"{name}.csv", tmp_path / f"{name}-b.csv"]
        frame.assign(model="other").to_csv(inputs[name][1], index=False)
    outs = {name: tmp_path / f"{name}.csv" for name in ("match", "table_ii", "predictor", "prefetch", "latency")}
    tables = ("match", "predictor", "prefetch", "latency")
    pattern_study.pattern_tables(*(inputs[name] for name in tables), *outs.values())
    first = {name: path.read_bytes() for name, path in outs.items()}
    pattern_study.pattern_tables(*(inputs[name][::-1] for name in tables), *outs.values())
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
