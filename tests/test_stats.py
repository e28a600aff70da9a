"""Streaming statistics against numpy computed on the same stored (16-bit or float32) values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsparse import stats as stats_module
from actsparse.stats import (
    EDGES,
    NBINS,
    OVERFLOW_BIN,
    UNDERFLOW_BIN,
    STATS_FORMAT,
    ZERO_BIN,
    StoreStats,
    TensorStats,
    summarize,
)

DTYPES_16 = [torch.float16, torch.bfloat16]  # counted by bit pattern, by C or PyTorch
DTYPES = DTYPES_16 + [torch.float32]

RTOL = 1e-12  # float64 sums of n >= 0 exact terms err by <= n * 2**-53: < 1e-12 for n < 9000


def activations(
    dtype: torch.dtype, tokens: int = 300, channels: int = 24, seed: int = 0
) -> torch.Tensor:
    """Magnitudes over the whole histogram range and past it, zeros, and values at the edges."""
    rng = np.random.default_rng(seed)
    values = 10.0 ** rng.uniform(-11, 6, size=(tokens, channels))
    values *= rng.choice([-1.0, 1.0], size=values.shape)
    values[rng.random(values.shape) < 0.2] = 0.0
    values.flat[: len(EDGES)] = EDGES  # the dtype's nearest values to the edges
    values.flat[len(EDGES) : 2 * len(EDGES)] = -EDGES
    return torch.from_numpy(values).to(dtype)


def reference_hist(x: torch.Tensor) -> np.ndarray:
    """Our bin layout built from np.histogram over [0, EDGES..., inf]."""
    magnitudes = np.abs(x.to(torch.float64).numpy()).ravel()
    counts, _ = np.histogram(magnitudes, np.concatenate([[0], EDGES, [np.inf]]))
    below_first, *log_bins, overflow = counts
    zeros = int((magnitudes == 0).sum())
    return np.array([zeros, below_first - zeros, *log_bins, overflow])


def stats_of(*batches: torch.Tensor) -> TensorStats:
    stats = TensorStats.empty(batches[0].shape[1])
    for batch in batches:
        stats.update(batch)
    return stats


@pytest.fixture(params=["native", "torch"])
def summary_path(request, monkeypatch) -> str:
    """Each test taking this runs on the C summary and on the PyTorch ops (the GPU's and the
    no-compiler fallback)."""
    if request.param == "native":
        assert stats_module.native_library() is not None, "the C summary must build where tests run"
    else:
        monkeypatch.setattr(stats_module, "native_library", lambda: None)
    return request.param


@pytest.mark.parametrize("block_values", [None, 24 * 16])  # torch path: default; 16-row blocks, one partial
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_matches_numpy_on_the_stored_values(dtype, block_values, summary_path, monkeypatch) -> None:
    if block_values:
        monkeypatch.setattr(stats_module, "SUM_BLOCK_VALUES", block_values)
    x = activations(dtype)
    stats = stats_of(*x.split(70))
    values = x.to(torch.float64).numpy()

    assert stats.hist.tolist() == reference_hist(x).tolist()
    assert stats.zeros == int((values == 0).sum()) == stats.hist[ZERO_BIN]
    assert stats.count == values.size and stats.tokens == len(values)
    assert stats.hist[OVERFLOW_BIN] > 0
    if dtype == torch.bfloat16:  # float16 holds no magnitude in (0, 6e-8)
        assert stats.hist[UNDERFLOW_BIN] > 0
    assert stats.zero_fraction == (values == 0).mean()
    np.testing.assert_allclose(stats.sum_abs, np.abs(values).sum(0), rtol=RTOL)
    np.testing.assert_allclose(stats.channel_mean_abs(), np.abs(values).mean(0), rtol=RTOL)


def test_sums_of_batches_of_many_blocks_match_numpy(summary_path) -> None:
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.lognormal(0, 2, size=(12_000, 40))).to(torch.float16)
    values = x.to(torch.float64).numpy()
    assert len(x) > 3 * stats_module.SUM_BLOCK_VALUES // 40  # several blocks, one partial
    summary = summarize(x)
    np.testing.assert_allclose(summary.sum_abs, np.abs(values).sum(0), rtol=RTOL)


@pytest.mark.parametrize("dtype", DTYPES_16)
def test_c_summary_equals_the_pytorch_ops(dtype: torch.dtype) -> None:
    """Same counts and sums on a transposed (non-contiguous) batch, with inf, -0, subnormals and
    long runs of zeros (the interleaved count tables' case)."""
    x = activations(dtype, tokens=500, channels=33, seed=3)
    x[:200] = 0
    x[200, :3] = torch.tensor([float("inf"), -0.0, 2.0**-20])
    x = x.t()
    native, torch_ops = summarize(x), summarize(x, use_native=False)
    assert np.array_equal(native.patterns, torch_ops.patterns)
    assert native.patterns[0] >= 200 * 33
    np.testing.assert_allclose(native.sum_abs, torch_ops.sum_abs, rtol=RTOL)


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_summary_without_sums_counts_the_same_and_is_refused_where_sums_are_kept(dtype, use_native) -> None:
    """Components no method reads sums of skip them (one pass over the values instead of two):
    the same counts, no sums; statistics that keep sums do not take such a summary."""
    x = activations(dtype, tokens=300, channels=17, seed=5)
    full, countless = summarize(x, use_native), summarize(x, use_native, sums=False)
    assert countless.sum_abs is None and countless.channels == full.channels == 17
    assert np.array_equal(countless.per_bin(), full.per_bin())
    assert full.patterns is None or np.array_equal(countless.patterns, full.patterns)
    keeping, skipping = StoreStats(), StoreStats(summed=["up"])
    skipping.update(3, "act", x)  # act keeps no sums here, so its summary skips them
    assert skipping[3, "act"].sum_abs is None and np.array_equal(skipping[3, "act"].hist, full.per_bin()[:-1])
    with pytest.raises(ValueError, match="layer 3 act: batch summary has no channel sums"):
        keeping.add(3, "act", countless)


def test_stats_work_without_a_c_compiler(monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    stats_module.native_library.cache_clear()
    try:
        assert stats_module.native_library() is None
        assert "compiling the C stats summary failed" in caplog.text
        x = activations(torch.float16)
        assert stats_of(x).hist.tolist() == reference_hist(x).tolist()
    finally:
        stats_module.native_library.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
def test_adding_summaries_equals_updating(dtype: torch.dtype) -> None:
    x = activations(dtype)
    updated, added = StoreStats(), StoreStats()
    for batch in x.split(100):
        updated.update(4, "gate", batch)
        added.add(4, "gate", summarize(batch))
    for part in ("hist", "sum_abs"):
        assert np.array_equal(getattr(added[4, "gate"], part), getattr(updated[4, "gate"], part))
    assert summarize(x).per_bin().sum() == x.numel()


def test_edges_are_fixed_and_log_spaced() -> None:
    assert len(EDGES) == 121 and NBINS == 123
    assert EDGES[0] == 1e-8 and EDGES[-1] == 1e4
    np.testing.assert_allclose(np.diff(np.log10(EDGES)), 0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cdf_is_the_exact_fraction_below_each_edge(dtype: torch.dtype) -> None:
    x = activations(dtype)
    stats = stats_of(x)
    magnitudes = np.abs(x.to(torch.float64).numpy()).ravel()
    below_edges = (magnitudes[:, None] < EDGES).mean(0)

    np.testing.assert_allclose(stats.cdf_at(EDGES), below_edges, rtol=1e-12)
    assert stats.cdf_at(0.0) == 0.0
    assert stats.cdf_at(1e-30) == pytest.approx((magnitudes == 0).mean())
    assert stats.cdf_at(1e9) == stats.cdf_at(EDGES[-1]) < 1  # overflow never counts as below


def test_cdf_interpolates_inside_a_bin() -> None:
    stats = stats_of(activations(torch.bfloat16))
    lo, hi = EDGES[50], EDGES[51]
    mid = np.sqrt(lo * hi)  # halfway in log10
    cdf_lo, cdf_mid, cdf_hi = stats.cdf_at([lo, mid, hi])
    assert cdf_lo < cdf_hi
    assert cdf_mid == pytest.approx((cdf_lo + cdf_hi) / 2)
    cdf = stats.cdf_at(np.logspace(-12, 8, 500))
    assert np.all(np.diff(cdf) >= 0)


def test_merge_equals_stats_over_both_shards() -> None:
    a, b = activations(torch.bfloat16, seed=1), activations(torch.bfloat16, seed=2)
    shard_a, shard_b, both = StoreStats(), StoreStats(), StoreStats()
    shard_a.update(0, "act", a)
    shard_b.update(0, "act", b)
    shard_b.update(3, "up", b)  # a key only one shard has
    both.update(0, "act", torch.cat([a, b]))
    both.update(3, "up", b)

    shard_a.merge(shard_b)
    assert list(shard_a) == list(both) == [(0, "act"), (3, "up")]
    for key in both:
        assert shard_a[key].hist.tolist() == both[key].hist.tolist()
        np.testing.assert_allclose(shard_a[key].sum_abs, both[key].sum_abs, rtol=RTOL)


def test_merge_refuses_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="merge 8 channels into 24"):
        stats_of(activations(torch.float16)).merge(TensorStats.empty(8))


def test_save_load_round_trip(tmp_path) -> None:
    stats = StoreStats()
    stats.update(2, "gate", activations(torch.float16))
    stats.update(0, "h", activations(torch.bfloat16, channels=7))
    path = tmp_path / "shard-0.stats.safetensors"
    stats.save(path)
    loaded = StoreStats.load(path)

    assert list(loaded) == [(0, "h"), (2, "gate")]
    for key in stats:
        for part in ("hist", "sum_abs"):
            assert np.array_equal(getattr(loaded[key], part), getattr(stats[key], part))
    assert not path.with_name(path.name + ".partial").exists()


def test_channel_sums_are_kept_only_for_the_summed_components(tmp_path) -> None:
    stats = StoreStats(summed={"up"})
    up, act = activations(torch.float16), activations(torch.float16, channels=7)
    stats.update(0, "up", up)
    stats.update(0, "act", act)
    path = tmp_path / "shard-0.stats.safetensors"
    stats.save(path)
    loaded = StoreStats.load(path)

    np.testing.assert_allclose(loaded[0, "up"].channel_mean_abs(), up.abs().double().mean(0).numpy(), rtol=RTOL)
    assert loaded[0, "act"].sum_abs is None
    assert (loaded[0, "act"].channels, loaded[0, "act"].tokens) == (7, len(act))
    assert np.array_equal(loaded[0, "act"].hist, stats[0, "act"].hist)
    with pytest.raises(ValueError, match="no channel sums were kept"):
        loaded[0, "act"].channel_mean_abs()
    with pytest.raises(ValueError, match="with channel sums and statistics without"):
        loaded[0, "act"].merge(TensorStats.empty(7))


def test_a_format_2_file_with_every_sum_still_loads(tmp_path) -> None:
    from safetensors.numpy import save

    from actsparse.provenance import write_safetensors

    stats = StoreStats()
    stats.update(3, "up", activations(torch.bfloat16))
    path = tmp_path / "old.stats.safetensors"
    arrays = {"edges": EDGES, "layers/3/up/hist": stats[3, "up"].hist, "layers/3/up/sum_abs": stats[3, "up"].sum_abs}
    write_safetensors(path, save(arrays, metadata={"format": "actsparse.stats/2", "keys": '[[3, "up"]]'}))
    loaded = StoreStats.load(path)
    assert np.array_equal(loaded[3, "up"].sum_abs, stats[3, "up"].sum_abs)


def test_load_refuses_a_foreign_file(tmp_path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"edges": EDGES}, path, metadata={"format": "something else"})
    with pytest.raises(ValueError, match=f"not an {STATS_FORMAT} file .* delete it and rerun"):
        StoreStats.load(path)


def test_refused_batches_change_nothing() -> None:
    stats = StoreStats()
    x = activations(torch.float16)
    stats.update(1, "act", x)
    before = stats[(1, "act")].hist.copy()
    poisoned = x.clone()
    poisoned[3, 4] = float("nan")

    with pytest.raises(ValueError, match=r"layer 1 act: batch holds 1 NaN"):
        stats.update(1, "act", poisoned)
    with pytest.raises(ValueError, match="stored values"):
        stats.update(1, "act", x.double())
    with pytest.raises(ValueError, match="12 channels, earlier ones 24"):
        stats.update(1, "act", x[:, :12])
    with pytest.raises(ValueError, match="unknown component 'actt'"):
        stats.update(1, "actt", x)
    with pytest.raises(ValueError, match="2-D"):
        stats.update(2, "act", x[0])
    with pytest.raises(ValueError, match=r"layer 1 act: batch holds 1 NaN"):
        stats.add(1, "act", summarize(poisoned))
    assert np.array_equal(stats[(1, "act")].hist, before)
    assert list(stats) == [(1, "act")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_the_gpu_equals_the_cpu() -> None:
    x = activations(torch.bfloat16)
    on_cpu, on_gpu = stats_of(x), stats_of(x.cuda())
    assert on_gpu.hist.tolist() == on_cpu.hist.tolist()
    np.testing.assert_allclose(on_gpu.sum_abs, on_cpu.sum_abs, rtol=RTOL)


def test_layer_must_be_a_non_negative_integer() -> None:
    stats = StoreStats()
    stats.update(np.int64(2), "up", activations(torch.float16))
    assert list(stats) == [(2, "up")]
    for layer in (-1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="layer must be a non-negative int"):
            stats.update(layer, "up", activations(torch.float16))


def test_empty_stats_refuse_fractions() -> None:
    with pytest.raises(ValueError, match="no values"):
        TensorStats.empty(4).cdf_at(1.0)
