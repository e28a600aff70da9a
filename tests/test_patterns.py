"""Tests for actsparse.patterns: variants, match rates, the predictor and the prefetch simulation."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.models import byte_tokenizer
from actsparse.patterns import (
    PAPER_SIMILARITIES,
    Hardware,
    PatternPair,
    Ranking,
    aligned_similarity,
    chance_agreement,
    evaluate_predictor,
    frequency_baseline,
    ffn_seconds,
    headline_budget,
    hot_neuron_jaccard,
    latency_table,
    make_variants,
    match_table,
    mlp_cost,
    paper_layers,
    paper_match_rate,
    plot_latency,
    plot_prefetch,
    prefetch_sweep,
    simulate_prefetch,
    table_ii,
    token_aligned_agreement,
    train_predictor,
    unchanged_positions,
)

BOS, EOS, VOCAB = 256, 257, 260
SPECIALS = (256, 257, 258, 259)
WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat".split()


def _sample_ids(length: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [BOS, *rng.integers(0, 256, length - 2).tolist(), EOS]


# --- variants -------------------------------------------------------------------------------


def test_token_variants_hit_nominal_similarity_and_respect_specials():
    ids = _sample_ids(200)
    variants = make_variants(ids, strategy="token", rng=3, vocab_size=VOCAB, special_ids=SPECIALS)
    assert [v.nominal for v in variants] == list(PAPER_SIMILARITIES)
    for v in variants:
        changed = np.flatnonzero(np.array(v.items) != np.array(ids))
        assert np.array_equal(changed, np.flatnonzero(v.changed))
        assert len(changed) == round((1 - v.nominal) * 200)
        assert v.measured == pytest.approx(1 - len(changed) / 200)
        assert abs(v.measured - v.nominal) <= 0.01
        assert aligned_similarity(ids, v.items) == pytest.approx(v.measured)
        assert not set(np.array(v.items)[changed]) & set(SPECIALS)
        assert v.items[0] == BOS and v.items[-1] == EOS
    for looser, tighter in zip(variants[1:], variants):
        assert np.all(looser.changed[tighter.changed])  # nested edits
        assert np.array_equal(np.array(looser.items)[tighter.changed], np.array(tighter.items)[tighter.changed])


def test_token_variants_are_seeded():
    ids = _sample_ids(100)
    kwargs = dict(strategy="token", vocab_size=VOCAB, special_ids=SPECIALS)
    assert make_variants(ids, rng=5, **kwargs)[-1].items == make_variants(ids, rng=5, **kwargs)[-1].items
    assert make_variants(ids, rng=5, **kwargs)[-1].items != make_variants(ids, rng=6, **kwargs)[-1].items


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(50, 400),
    similarity=st.floats(0.5, 1.0),
    seed=st.integers(0, 2**16),
)
def test_token_variant_similarity_within_half_a_position(length, similarity, seed):
    """round((1-s)*L) edits: within 1/(2L) of s (one point at L = 50), up to float rounding."""
    ids = np.random.default_rng(seed).integers(0, 8, length).tolist()  # tiny alphabet: collisions likely
    (variant,) = make_variants(ids, [similarity], "token", seed, vocab_size=8)
    assert abs(aligned_similarity(ids, variant.items) - similarity) <= 1 / (2 * length) + 1e-12


def test_token_variants_reject_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        make_variants([1, 2, 3], strategy="token")
    with pytest.raises(ValueError, match="token ids"):
        make_variants([1, 2, 300], strategy="token", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="only 1 of 3 positions"):
        make_variants([BOS, 5, EOS], [0.3], "token", vocab_size=VOCAB, special_ids=SPECIALS)
    with pytest.raises(ValueError, match="strategy"):
        make_variants([1, 2], strategy="char", vocab_size=VOCAB)


def test_word_variants_draw_other_pool_words_and_measure_tokens():
    variants = make_variants(WORDS, strategy="word", rng=1, word_pool=WORDS, length_key=len)
    tokenizer = byte_tokenizer()
    original_text = " ".join(WORDS)
    original_ids = tokenizer(original_text).input_ids
    for v in variants:
        assert len(v.items) == len(WORDS)
        assert v.measured == pytest.approx(1 - v.changed.sum() / len(WORDS))
        for old, new, changed in zip(WORDS, v.items, v.changed):
            assert (old != new) == changed
            assert new in WORDS and len(new) == len(old)
        # Same-length words keep one byte token per character aligned, so the token similarity
        # is the character-level similarity of the two texts.
        text = " ".join(v.items)
        same_chars = sum(a == b for a, b in zip(original_text, text)) / len(original_text)
        assert aligned_similarity(original_ids, tokenizer(text).input_ids) == pytest.approx(same_chars)


def test_word_variants_without_alternative_fail_early():
    with pytest.raises(ValueError, match="no other pool word"):
        make_variants(["aa", "bb", "cc"], [0.1], "word", word_pool=["aa", "xyz"], length_key=len)
    with pytest.raises(ValueError, match="words"):
        make_variants([1, 2, 3], strategy="word")


def test_unchanged_positions_with_unequal_lengths():
    assert unchanged_positions([1, 2, 3, 4], [1, 9, 3]).tolist() == [True, False, True, False]
    assert aligned_similarity([1, 2, 3, 4], [1, 9, 3]) == 0.5
    assert aligned_similarity([1, 2], [1, 2, 7, 7]) == 1.0  # appended tokens are not compared


# --- match rates ----------------------------------------------------------------------------

P = np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)
Q = np.array([[1, 1], [1, 1], [1, 0]], dtype=bool)


def test_token_aligned_agreement_by_hand():
    # rows 0 and 1: cells (1,1) (0,1) (1,1) (1,1) -> 3 of 4 agree
    assert token_aligned_agreement(P, Q, np.array([True, True, False])) == 0.75
    # all rows: row 2 adds (0,1) disagree and (0,0) agree -> 4 of 6
    assert token_aligned_agreement(P, Q) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="no unchanged"):
        token_aligned_agreement(P, Q, np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="past the end"):
        token_aligned_agreement(P, Q[:2], np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        token_aligned_agreement(P.astype(int), Q)


def test_hot_neuron_jaccard_by_hand():
    # P activity per neuron (2/3, 1/3) -> hot {0}; Q (1, 2/3) -> hot {0, 1}
    assert hot_neuron_jaccard(P, Q, 0.5) == 0.5
    assert hot_neuron_jaccard(P, Q, 0.3) == 1.0  # both {0, 1}
    assert hot_neuron_jaccard(P, Q, 1.0) == 0.0  # {} vs {0}
    assert hot_neuron_jaccard(P & False, Q & False, 0.5) == 1.0  # two empty sets


def test_paper_match_rate_uses_window_and_prefix():
    rng = np.random.default_rng(0)
    p = rng.random((100, 80)) < 0.5
    q = p.copy()
    q[70:] = ~q[70:]  # edits only after the 64-token tile: the tile still matches exactly
    assert paper_match_rate(p, q) == 1.0
    q[10, :4] = ~q[10, :4]
    assert paper_match_rate(p, q) == 1 - 4 / (64 * 64)
    assert paper_match_rate(p, q, window=None) == pytest.approx(1 - (4 + 30 * 80) / (100 * 80))
    assert paper_match_rate(p, q[:50]) == 1 - 4 / (50 * 64)  # common prefix only
    with pytest.raises(ValueError, match="window"):
        paper_match_rate(p, q, window=(0, 8))


def test_chance_agreement_matches_unrelated_patterns():
    assert chance_agreement(P, Q) == pytest.approx(0.5 * (4 / 6) + 0.5 * (2 / 6))
    rng = np.random.default_rng(1)
    p, q = rng.random((400, 400)) < 0.5, rng.random((400, 400)) < 0.3
    assert paper_match_rate(p, q, None) == pytest.approx(chance_agreement(p, q), abs=0.01)


def _pairs() -> list[PatternPair]:
    rng = np.random.default_rng(2)
    pairs = []
    for sample in (1, 2):
        ids = rng.integers(0, 256, 20).tolist()
        original = [rng.random((20, 6)) < 0.5 for _ in range(4)]
        for similarity in (0.9, 0.7):
            variant_ids = list(ids)
            for i in range(round((1 - similarity) * 20)):
                variant_ids[i] = (ids[i] + 1) % 256
            variant = [~p if sample == 2 else p.copy() for p in original]
            pairs.append(PatternPair(sample, similarity, ids, variant_ids, original, variant))
    return pairs


def test_match_table_and_table_ii():
    table = match_table(_pairs(), hot_fraction=0.5, window=(8, 4))
    assert list(table.columns) == ["sample", "similarity", "measured_similarity", "layer", "metric", "match_rate"]
    assert len(table) == 2 * 2 * 4 * 3
    measured = table.groupby("similarity")["measured_similarity"].unique()
    assert measured[0.9].tolist() == [0.9] and measured[0.7].tolist() == [0.7]
    rates = table.groupby(["sample", "metric"])["match_rate"].unique()
    assert rates[(1, "paper_match_rate")].tolist() == [1.0]  # identical patterns
    assert rates[(2, "paper_match_rate")].tolist() == [0.0]  # inverted patterns
    assert rates[(2, "token_aligned_agreement")].tolist() == [0.0]

    wide = table_ii(table)
    assert list(wide.columns) == [0.9, 0.7]
    assert wide.index.get_level_values("layer").unique().tolist() == paper_layers(4) == [0, 1, 2, 3]
    assert wide.loc[(3, 2), 0.7] == 0.0
    with pytest.raises(ValueError, match="layers"):
        table_ii(table, layers=[7])
    with pytest.raises(ValueError, match="metric"):
        table_ii(table, metric="nope")


def test_paper_layers():
    assert paper_layers(32) == [0, 10, 21, 31]
    assert paper_layers(1) == [0]


# --- predictor ------------------------------------------------------------------------------


def _synthetic_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Target neuron j is active iff |x . w_j| exceeds the median of |N(0,1)|: each neuron is on
    half the time, so a fixed set of neurons (the frequency baseline) cannot capture it."""
    weights = np.random.default_rng(0).normal(size=(12, 20))
    weights /= np.linalg.norm(weights, axis=0)
    x = np.random.default_rng(seed).normal(size=(n, 12))
    return x, np.abs(x @ weights) > 0.6745


def test_predictor_beats_frequency_baseline_and_is_deterministic(one_torch_thread):
    x_train, y_train = _synthetic_task(1500, seed=1)
    x_test, y_test = _synthetic_task(500, seed=2)
    rng_state = torch.get_rng_state()
    predictor = train_predictor(x_train, y_train, hidden=64, epochs=40, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    ours = evaluate_predictor(predictor.scores(x_test) >= 0.5, y_test)
    baseline = evaluate_predictor(frequency_baseline(y_train), y_test)
    assert ours["f1"] > 0.85
    assert baseline["f1"] < 0.6
    again = train_predictor(x_train, y_train, hidden=64, epochs=40, seed=0)
    assert np.array_equal(predictor.scores(x_test), again.scores(x_test))


def test_evaluate_predictor_and_baseline_by_hand():
    actual = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool)
    predicted = np.array([[1, 0, 0, 1], [1, 0, 1, 1]], dtype=bool)
    # hits 3, predicted 5, actual 4
    assert evaluate_predictor(predicted, actual) == pytest.approx({"precision": 0.6, "recall": 0.75, "f1": 6 / 9})
    train = np.array([[1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0]], dtype=bool)
    # frequencies (1, 1/3, 2/3, 1/3), mean 2 active -> neurons {0, 2}
    assert frequency_baseline(train).tolist() == [True, False, True, False]
    assert frequency_baseline(train, k=3).tolist() == [True, True, True, False]  # tie -> lower index
    with pytest.raises(ValueError, match="bool"):
        train_predictor(np.zeros((3, 2)), np.zeros((3, 2)))


# --- prefetch -------------------------------------------------------------------------------

SCORES = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
ACTUAL = np.array([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=bool)


def test_simulate_prefetch_by_hand():
    # budget 2 fetches {0, 2} then {1, 2}: hits 1 + 2 of 5 active, 4 rows fetched
    result = simulate_prefetch(SCORES, ACTUAL, budget_rows=2, bytes_per_row=10)
    assert result == pytest.approx(
        {"recall": 0.6, "precision": 0.75, "bytes_fetched": 40, "dense_bytes": 80, "late_bytes": 20}
    )
    static = simulate_prefetch(np.array([0.0, 1.0, 0.5, 0.2]), ACTUAL, budget_rows=1, bytes_per_row=10)
    assert static["recall"] == 0.2 and static["late_bytes"] == 40  # row 1 only: active once
    with pytest.raises(ValueError, match="budget_rows"):
        simulate_prefetch(SCORES, ACTUAL, budget_rows=5, bytes_per_row=10)


def test_prefetch_sweep_and_plot(tmp_path):
    table = prefetch_sweep({0: SCORES, 3: SCORES[:, ::-1]}, {0: ACTUAL, 3: ACTUAL}, 10, (0.5, 1.0))
    assert list(table.columns) == [
        "layer", "budget_fraction", "recall", "precision", "bytes_fetched", "dense_bytes", "late_bytes",
    ]
    assert table["layer"].tolist() == [0, 0, 3, 3]
    assert table.loc[0, "recall"] == 0.6
    assert table[table.budget_fraction == 1.0]["recall"].tolist() == [1.0, 1.0]
    assert table[table.budget_fraction == 1.0]["late_bytes"].tolist() == [0, 0]
    path = plot_prefetch(table, tmp_path / "prefetch.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="layers differ"):
        prefetch_sweep({0: SCORES}, {1: ACTUAL}, 10)


def test_ranking_counts_hits_at_every_budget_like_a_fresh_top_k():
    rng = np.random.default_rng(5)
    scores, actual = rng.random((7, 9)), rng.random((7, 9)) < 0.4
    ranking = Ranking.of(scores, actual)
    for m in range(10):
        top = np.argsort(-scores, axis=1)[:, :m]  # no ties among random floats
        assert ranking.hits_at(m).tolist() == [int(actual[t, top[t]].sum()) for t in range(7)]
    assert ranking.active.tolist() == actual.sum(1).tolist()
    static = Ranking.of(scores[0], actual)
    assert static.hits_at(3).tolist() == actual[:, np.argsort(-scores[0])[:3]].sum(1).tolist()


# --- latency model --------------------------------------------------------------------------

PHONE = Hardware("phone", bandwidth_gbs=1.0, miss_bandwidth_gbs=0.25, compute_gflops=50.0, bytes_per_weight=2)
SLOW_CORE = Hardware("slow-core", bandwidth_gbs=40.0, miss_bandwidth_gbs=40.0, compute_gflops=5.0,
                     bytes_per_weight=4)  # compute-bound
WEIGHTS_PER_ROW = 3 * 64


def _seconds(rows_fetched: float, rows_computed: float, rows_late: float, device: Hardware) -> float:
    """The latency model written out: fetch overlaps compute, late rows are fetched after."""
    fetch = rows_fetched * WEIGHTS_PER_ROW * device.bytes_per_weight / (device.bandwidth_gbs * 1e9)
    compute = rows_computed * WEIGHTS_PER_ROW * 2 / (device.compute_gflops * 1e9)
    late = rows_late * WEIGHTS_PER_ROW * device.bytes_per_weight / (device.miss_bandwidth_gbs * 1e9)
    return max(fetch, compute) + late


def test_ffn_seconds_by_hand():
    # phone: 10 rows fetched = 10 * 192 * 2 B at 1 GB/s = 3.84 us; compute 12 rows = 12 * 384 / 50e9 = 0.09 us;
    # 2 missed rows = 2 * 384 B at 0.25 GB/s
    assert ffn_seconds(10, np.array([2]), WEIGHTS_PER_ROW, PHONE)[0] == pytest.approx(3.84e-6 + 2 * 384e-9 / 0.25)
    # compute-bound: max picks the compute of the 12 rows held
    assert ffn_seconds(10, np.array([2]), WEIGHTS_PER_ROW, SLOW_CORE)[0] == pytest.approx(
        12 * 384 / 5e9 + 2 * 768 / 40e9)


@pytest.mark.parametrize("device", [PHONE, SLOW_CORE], ids=lambda d: d.name)
def test_latency_is_dense_at_full_budget_and_oracle_with_a_perfect_predictor(device):
    rng = np.random.default_rng(0)
    actual = {layer: rng.random((40, 16)) < p for layer, p in ((0, 0.3), (1, 0.6))}
    budgets = (0.25, 0.5, 1.0)
    noisy = {layer: a + rng.normal(0, 0.4, a.shape) for layer, a in actual.items()}
    perfect = {layer: a.astype(float) + rng.random(a.shape) * 0.5 for layer, a in actual.items()}  # active rows first
    tables = {name: latency_table({layer: Ranking.of(s[layer], actual[layer]) for layer in actual},
                                  WEIGHTS_PER_ROW, [device], budgets) for name, s in (("noisy", noisy), ("perfect", perfect))}
    dense = sum(_seconds(16, 16, 0, device) for _ in actual) * 1e3
    for table in tables.values():
        assert table["dense_ms"].tolist() == pytest.approx([dense] * 3, rel=1e-12)
        full = table[table.budget_fraction == 1.0].iloc[0]
        assert full.time_ms == pytest.approx(dense, rel=1e-12) and full.oracle_ms == pytest.approx(dense, rel=1e-12)
    for fraction, row in zip(budgets, tables["perfect"].itertuples()):
        m = round(fraction * 16)
        oracle = sum(np.mean([_seconds(m, max(m, a), max(a - m, 0), device) for a in mask.sum(1)])
                     for mask in actual.values()) * 1e3
        assert row.oracle_ms == pytest.approx(oracle, rel=1e-12)
        assert row.time_ms == pytest.approx(oracle, rel=1e-12)
        if row.dense_ms > row.oracle_ms * (1 + 1e-9):
            assert row.saving_recovered == pytest.approx(1.0)
        else:  # misses at the slow on-demand rate can cost the oracle more than dense execution
            assert np.isnan(row.saving_recovered)
    noisy_half = tables["noisy"][tables["noisy"].budget_fraction == 0.5].iloc[0]
    assert noisy_half.oracle_ms < noisy_half.time_ms < noisy_half.dense_ms  # an imperfect predictor: in between
    assert np.isnan(tables["noisy"].saving_recovered.iloc[-1])  # at budget 1 the oracle saves nothing


def test_latency_figure_and_headline_budget(tmp_path):
    assert headline_budget((0.1, 0.3, 0.5)) == 0.3 and headline_budget((0.4, 1.0)) == 0.4
    actual = {0: np.random.default_rng(1).random((20, 8)) < 0.5}
    ranking = {0: Ranking.of(np.zeros(8), actual[0])}
    table = latency_table(ranking, WEIGHTS_PER_ROW, [PHONE, SLOW_CORE], (0.4, 1.0)).assign(features="frequency")
    path = plot_latency(table, tmp_path / "latency.png", headline="frequency")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlp_cost_counts_weights_biases_and_multiply_adds():
    net = torch.nn.Sequential(torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.Linear(5, 20))
    params, flops = mlp_cost(12, 5, 20)
    assert params == sum(p.numel() for p in net.parameters())
    assert flops == 2 * (12 * 5 + 5 * 20)


def test_the_prefetch_figure_has_a_title_and_tells_every_predictor_of_a_layer_apart(tmp_path):
    from unittest.mock import patch

    from actsparse import patterns

    sweep = prefetch_sweep({0: SCORES, 3: SCORES[:, ::-1]}, {0: ACTUAL, 3: ACTUAL}, 10, (0.5, 1.0))
    names = ("frequency", "hot_set", "lookahead", "oracle", "pattern")
    table = pd.concat([sweep.assign(features=name) for name in names], ignore_index=True)
    with patch.object(patterns, "write_figure") as write:
        plot_prefetch(table, tmp_path / "prefetch.png")
    axes = write.call_args[0][0].axes[0]
    assert axes.get_title() and axes.get_xlabel() and axes.get_ylabel()
    for layer in (0, 3):
        lines = [line for line in axes.get_lines() if line.get_label().endswith(f"layer {layer}")]
        assert len(lines) == len(names)
        assert len({(str(line.get_linestyle()), line.get_marker()) for line in lines}) == len(names)
