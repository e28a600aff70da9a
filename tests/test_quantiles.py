"""exact_quantiles / QuantileSketch against numpy.percentile, sorting and hand-computed values."""

from __future__ import annotations

import copy
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actsparse import quantiles
from actsparse.quantiles import QuantileSketch, exact_quantiles

FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=True, allow_subnormal=True)
# Few distinct values, so ties (and zeros) are frequent.
FEW = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, 3e38, -3e38, 0.5, 2.0])
VALUES = st.one_of(
    hnp.arrays(np.float32, st.integers(1, 400), elements=FLOAT32),
    hnp.arrays(np.float32, st.integers(1, 400), elements=FEW),
    hnp.arrays(np.float32, st.integers(1, 50), elements=FLOAT32).map(np.abs),
)
QS = st.lists(st.floats(0, 1), max_size=8).map(lambda qs: [0.0, 1.0, *qs])


def percentile(values: np.ndarray, qs: list[float]) -> np.ndarray:
    """The reference; infinities make numpy warn about inf - inf, which is its defined output."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.percentile(values, 100 * np.asarray(qs))


def split(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return np.split(values, sorted(c % (values.size + 1) for c in cuts))


@settings(max_examples=300, deadline=None)
@given(VALUES, QS, st.lists(st.integers(0, 10**6), max_size=6))
@example(np.array([7.5], np.float32), [0.0, 0.5, 1.0], [])
@example(np.full(100, 3.25, np.float32), [0.0, 0.3, 1.0], [50])
@example(np.array([-3e38, 3e38], np.float32), [0.0, 0.5, 0.25, 1.0], [1])
def test_equals_numpy_percentile(values: np.ndarray, qs: list[float], cuts: list[int]) -> None:
    chunks = split(values, cuts)
    result = exact_quantiles(lambda: iter(chunks), qs)
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, percentile(values, qs))


def test_hand_computed_values() -> None:
    values = np.array([4, 1, 3, 2], np.float32)  # sorted: 1 2 3 4, virtual index 3q
    result = exact_quantiles(lambda: [values[:3], values[3:]], [0, 0.5, 0.1, 0.9, 1])
    # q = 0.1: v = 0.30000000000000004, 1 + v; q = 0.9: v = 2.7, g >= 0.5 so 4 - (1 - 0.7).
    np.testing.assert_array_equal(result, [1.0, 2.5, 1.3, 3.7, 4.0])


def test_interpolation_uses_float32_difference() -> None:
    """b - a overflows in float32, as in numpy: the halfway point of -3e38 and 3e38 is -inf."""
    values = np.array([3e38, -3e38], np.float32)
    result = exact_quantiles(lambda: [values], [0.5, 0.25])
    np.testing.assert_array_equal(result, [-np.inf, np.inf])


def test_many_ties_among_zeros_and_subnormals() -> None:
    """ReLU-like: most values zero; the needed ranks sit inside one heavy bucket."""
    rng = np.random.default_rng(0)
    values = np.abs(rng.standard_normal(200_000, dtype=np.float32))
    values[rng.random(values.size) < 0.9] = 0
    values[:1000] = np.float32(1e-44) * rng.integers(1, 5, 1000)
    qs = np.linspace(0, 1, 21)
    result = exact_quantiles(lambda: np.array_split(values, 7), qs)
    np.testing.assert_array_equal(result, np.percentile(values, 100 * qs))


def test_order_statistics_match_a_plain_sort() -> None:
    """Independent of numpy: with n - 1 = 1024 and q = k/1024, v = k exactly, no interpolation."""
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(1025) * 10.0 ** rng.integers(-40, 30, 1025)).astype(np.float32)
    ranks = [0, 1, 125, 512, 1023, 1024]
    result = exact_quantiles(lambda: [values], [k / 1024 for k in ranks])
    expected = [sorted(values.tolist())[k] for k in ranks]
    np.testing.assert_array_equal(result, expected)


def test_needed_buckets_hold_the_needed_ranks() -> None:
    rng = np.random.default_rng(2)
    values = rng.standard_normal(10_001, dtype=np.float32)
    sketch = QuantileSketch([0.1, 0.5, 0.9])
    sketch.add_pass1(values)
    ordered_bits = np.sort(values).view(np.uint32)
    expected = np.unique(ordered_bits[[1000, 1001, 5000, 5001, 9000, 9001]] >> 16)
    np.testing.assert_array_equal(np.sort(sketch.needed_buckets), np.sort(expected))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_chunks_equal_numpy_on_their_float32_cast(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    tensor = torch.randn(64, 300, generator=generator).to(dtype)
    chunks = [tensor[:, :100], tensor[:, 100:].T]  # non-contiguous views, other shapes
    qs = [0, 0.1, 0.5, 0.9, 1]
    reference = np.percentile(tensor.float().numpy(), 100 * np.asarray(qs))
    np.testing.assert_array_equal(exact_quantiles(lambda: chunks, qs), reference)


@pytest.mark.parametrize("dtype", [np.float16, ">f4", ">f2"])
def test_float16_and_big_endian_numpy_chunks(dtype: str) -> None:
    values = np.random.default_rng(4).standard_normal(5000).astype(dtype)
    result = exact_quantiles(lambda: np.array_split(values, 3), [0.25, 0.75])
    np.testing.assert_array_equal(result, np.percentile(values.astype(np.float32), [25, 75]))


def sketch_of(qs: list[float], shards: list[np.ndarray]) -> QuantileSketch:
    sketch = QuantileSketch(qs)
    for shard in shards:
        sketch.add_pass1(shard)
    return sketch


def test_merged_pass1_equals_one_sketch_over_both_shards() -> None:
    rng = np.random.default_rng(5)
    shard_a = rng.standard_normal(3000, dtype=np.float32)
    shard_b = rng.exponential(size=5000).astype(np.float32)
    qs = [0.1, 0.5, 0.9]
    merged = sketch_of(qs, [shard_a])
    merged.merge(sketch_of(qs, [shard_b]))
    single = sketch_of(qs, [shard_a, shard_b])
    np.testing.assert_array_equal(merged.needed_buckets, single.needed_buckets)
    for sketch in (merged, single):
        sketch.add_pass2(shard_b)
        sketch.add_pass2(shard_a)
    expected = np.percentile(np.concatenate([shard_a, shard_b]), [10, 50, 90])
    np.testing.assert_array_equal(merged.result(), expected)
    np.testing.assert_array_equal(single.result(), expected)


def test_merged_pass2_equals_one_sketch_over_both_shards() -> None:
    """Shards read in parallel in both passes: merge pass 1, copy it to each shard, merge pass 2."""
    rng = np.random.default_rng(6)
    shards = [rng.standard_normal(2000, dtype=np.float32) for _ in range(3)]
    qs = [0.2, 0.8]
    merged = sketch_of(qs, shards[:1])
    for shard in shards[1:]:
        merged.merge(sketch_of(qs, [shard]))
    assert merged.needed_buckets.size > 0  # asking ends pass 1, before the copies
    workers = [copy.deepcopy(merged) for _ in shards]
    for worker, shard in zip(workers, shards):
        worker.add_pass2(shard)
    for worker in workers[1:]:
        workers[0].merge(worker)
    expected = np.percentile(np.concatenate(shards), [20, 80])
    np.testing.assert_array_equal(workers[0].result(), expected)


def test_merge_refuses_mismatched_sketches() -> None:
    values = np.arange(10, dtype=np.float32)
    with pytest.raises(ValueError, match="different qs"):
        sketch_of([0.5], [values]).merge(sketch_of([0.4], [values]))
    started = sketch_of([0.5], [values])
    started.add_pass2(values)
    with pytest.raises(ValueError, match="pass 1 with one in pass 2"):
        started.merge(sketch_of([0.5], [values]))


@pytest.mark.parametrize("compiled", [True, False], ids=["C count", "numpy count"])
def test_nan_is_refused_by_name_and_leaves_the_counts_as_they_were(monkeypatch, compiled: bool) -> None:
    if not compiled:
        monkeypatch.setattr(quantiles, "native_library", lambda: None)
    chunks = [np.ones(5, np.float32), np.array([1.0, np.nan], np.float32)]
    with pytest.raises(ValueError, match="NaN"):
        exact_quantiles(lambda: chunks, [0.5])
    with pytest.raises(ValueError, match="NaN"):
        exact_quantiles(lambda: [torch.tensor([0.0, float("nan")], dtype=torch.bfloat16)], [0.5])
    sketch = sketch_of([0.5], [np.float32([1.0, np.inf, -np.inf])])  # infinities are not NaN
    negative_nan = np.float32([2.0, -np.nan])
    assert np.signbit(negative_nan[1])
    with pytest.raises(ValueError, match="NaN"):
        sketch.add_pass1(negative_nan)
    assert sketch.count == 3


@pytest.mark.parametrize("chunks", [[], [np.array([], np.float32)], [torch.empty(0, 3)]])
def test_empty_input_is_refused(chunks: list) -> None:
    with pytest.raises(ValueError, match="empty input"):
        exact_quantiles(lambda: chunks, [0.5])


@pytest.mark.parametrize("qs", [[-0.01], [1.5], [0.5, float("nan")], []])
def test_bad_qs_are_refused(qs: list[float]) -> None:
    with pytest.raises(ValueError, match="q"):
        QuantileSketch(qs)


@pytest.mark.parametrize("chunk", [np.zeros(3), np.arange(3), torch.zeros(3, dtype=torch.int64)])
def test_non_float32_dtypes_are_refused(chunk: np.ndarray | torch.Tensor) -> None:
    with pytest.raises(TypeError, match="dtype"):
        QuantileSketch([0.5]).add_pass1(chunk)


@pytest.mark.parametrize("other", [np.arange(99), np.full(100, 1000)])
def test_pass2_on_other_values_is_detected(other: np.ndarray) -> None:
    sketch = sketch_of([0.5], [np.arange(100, dtype=np.float32)])
    sketch.add_pass2(other.astype(np.float32))
    with pytest.raises(ValueError, match="same values"):
        sketch.result()


def test_pass1_after_pass2_started_is_refused() -> None:
    sketch = sketch_of([0.5], [np.ones(3, np.float32)])
    sketch.add_pass2(np.ones(3, np.float32))
    with pytest.raises(RuntimeError, match="pass 2 started"):
        sketch.add_pass1(np.ones(3, np.float32))


def peak_bytes(values: int, chunk: int) -> int:
    """tracemalloc peak of exact_quantiles over values generated chunk by chunk."""

    def chunks():
        rng = np.random.default_rng(7)
        return (rng.standard_normal(chunk, dtype=np.float32) for _ in range(values // chunk))

    tracemalloc.start()
    exact_quantiles(chunks, np.linspace(0.1, 0.9, 9))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_the_number_of_values() -> None:
    """Counts take 512 KiB plus 128 KiB per needed bucket (<= 18 here, 16-bit counts), twice
    while adding; the carry rows, allocated but never touched here, are left out: tracemalloc
    counts their virtual size, 256 KiB a bucket."""
    bound = 2 * (2**19 + 18 * (2**17 + 2**18)) + 8 * 10**5  # plus the chunk: 100,000 values and their int64 copy
    assert peak_bytes(10**5, 10**5) < bound
    assert peak_bytes(10**7, 10**5) < bound  # the values alone would take 40 MB


def test_c_pass2_counts_equal_numpy_and_numpy_serves_without_a_compiler(monkeypatch) -> None:
    """The C sweeps and the numpy counts give the same bucket and low-half counts (ties, both signs, zeros,
    subnormals, infinities, a 100-level grid's buckets, a value repeated past a 16-bit count's
    65,535, which carries); without a C compiler numpy counts alone."""
    rng = np.random.default_rng(11)
    with np.errstate(over="ignore"):  # the largest scales overflow to +-inf, which is wanted
        spread = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-40, 38, 50_000)).astype(np.float32)
    values = np.concatenate([spread, np.float32([0.0, -0.0, np.inf, -np.inf, 1e-45]), np.full(140_000, 0.75, np.float32)])
    grid = np.arange(100) / 100

    def fed(sketch: QuantileSketch) -> QuantileSketch:
        for chunk in np.array_split(values, 7):
            sketch.add_pass1(chunk)
        for chunk in np.array_split(values, 3):
            sketch.add_pass2(chunk)
        return sketch

    assert quantiles.native_library() is not None
    by_c = fed(QuantileSketch(grid))
    monkeypatch.setattr(quantiles, "native_library", lambda: None)
    by_numpy = fed(QuantileSketch(grid))
    assert by_c._pass2._split.carries == by_numpy._pass2._split.carries == 2  # 140,000 = 2 * 65,536 + 8,928
    assert by_c.pass2_bytes == len(by_c.needed_buckets) * 2 << 16
    assert np.array_equal(by_c._counts, by_numpy._counts)  # pass 1
    assert np.array_equal(by_c._pass2._split.read(), by_numpy._pass2._split.read())
    assert by_c._pass2._split.read().max() == 140_000
    np.testing.assert_array_equal(by_numpy.result(), percentile(values, grid))
    np.testing.assert_array_equal(by_c.result(), by_numpy.result())


def test_counts_past_16_bits_carry_through_the_device_gather_and_a_merge(monkeypatch) -> None:
    """A value repeated 140,000 times in each of two shards: its count passes 65,535 in each
    shard's 16-bit row (counted on the "device", here the CPU through the PyTorch path) and again
    when the shards' pass-2 counts merge; the quantiles still equal numpy's."""
    monkeypatch.setattr(quantiles, "_on_device", lambda chunk: isinstance(chunk, torch.Tensor))
    rng = np.random.default_rng(12)
    shards = [np.concatenate([np.full(140_000, 0.75, np.float32), rng.standard_normal(5_000, dtype=np.float32)])
              for _ in range(2)]
    grid = np.arange(100) / 100
    merged = sketch_of(grid, [torch.from_numpy(shards[0])])
    merged.merge(sketch_of(grid, [torch.from_numpy(shards[1])]))
    assert merged.needed_buckets.size > 0  # ends pass 1 before the copies
    workers = [copy.deepcopy(merged) for _ in shards]
    for worker, shard in zip(workers, shards):
        worker.add_pass2(torch.from_numpy(shard))
    workers[0].merge(workers[1])
    assert workers[0]._pass2._split.read().max() == 280_000
    np.testing.assert_array_equal(workers[0].result(), percentile(np.concatenate(shards), grid))


def scaled_sample(dtype: torch.dtype, rows: int = 600, channels: int = 40) -> tuple[torch.Tensor, np.ndarray]:
    """16-bit values over many scales with ties, zeros, subnormals and a constant channel, and
    per-channel scales with a zero."""
    rng = np.random.default_rng(5)
    spread = rng.standard_normal((rows, channels)) * 10.0 ** rng.integers(-7, 3, (rows, channels))
    values = torch.from_numpy(spread.astype(np.float32)).to(dtype)
    values[::7, 3] = 0
    values[:, 5] = -0.375
    values[1, 6] = torch.finfo(dtype).smallest_normal / 4  # subnormal
    scales = np.abs(rng.standard_normal(channels)).astype(np.float32)
    scales[2] = 0
    return values, scales


def counted(values: torch.Tensor, chunks: int = 3) -> quantiles.ChannelMagnitudeCounts:
    counts = quantiles.ChannelMagnitudeCounts(values.shape[1], values.dtype)
    for chunk in values.tensor_split(chunks):
        counts.add(chunk)
    return counts


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_magnitude_counts_give_numpy_percentiles_of_the_scaled_magnitudes(monkeypatch, dtype, compiled) -> None:
    """One pass of counts, scales given afterwards: numpy.percentile of |x| * s in float32,
    bit for bit, on every level of a 100-level grid, in C and in numpy."""
    if not compiled:
        monkeypatch.setattr(quantiles, "native_library", lambda: None)
    values, scales = scaled_sample(dtype)
    grid = np.arange(100) / 100
    scored = (values.abs().float() * torch.from_numpy(scales)).numpy()
    got = counted(values).quantiles(scales, grid)
    assert np.array_equal(got.view(np.int64), percentile(scored, grid).view(np.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_magnitude_counts_of_crowded_channels_give_numpy_percentiles(dtype) -> None:
    """Normal values, 50,000 a channel: cells counted many times over, past a byte, runs of
    cells sharing one score bucket (summed at once by the C pass 1) and most cells far from any
    needed bucket (skipped unread by the C pass 2)."""
    values = torch.from_numpy(np.random.default_rng(9).standard_normal((50_000, 12)).astype(np.float32)).to(dtype)
    scales = np.float32(np.geomspace(1e-3, 40, 12))
    grid = np.arange(100) / 100
    scored = (values.abs().float() * torch.from_numpy(scales)).numpy()
    got = counted(values).quantiles(scales, grid)
    assert np.array_equal(got.view(np.int64), percentile(scored, grid).view(np.int64))


@pytest.mark.parametrize("wraps_held", [1 << 20, 3])
@pytest.mark.parametrize("compiled", [True, False])
def test_channel_magnitude_counts_carry_past_16_bits_through_the_device_gather(monkeypatch, compiled, wraps_held) -> None:
    """A channel holding one value 140,000 times carries its count (C, numpy, and counts kept
    on a device: PyTorch ops here on CPU tensors) and still gives numpy's quantiles, also where
    the counts past a byte are merged after every few (``WRAPS_HELD``)."""
    if not compiled:
        monkeypatch.setattr(quantiles, "native_library", lambda: None)
    monkeypatch.setattr(quantiles.ChannelMagnitudeCounts, "WRAPS_HELD", wraps_held)
    values = torch.full((140_000, 2), 0.75, dtype=torch.float16)
    values[::3, 1] = -2.5
    scales = np.float32([3.0, 0.5])
    qs = [0.0, 0.3, 0.5, 0.9, 1.0]
    expected = percentile((values.abs().float() * torch.from_numpy(scales)).numpy(), qs)
    assert np.array_equal(counted(values).quantiles(scales, qs), expected)
    monkeypatch.setattr(quantiles, "_on_device", lambda chunk: isinstance(chunk, torch.Tensor))
    assert np.array_equal(counted(values).quantiles(scales, qs), expected)


@pytest.mark.parametrize("compiled", [True, False])
def test_channel_magnitude_counts_refuse_nan_values_and_nan_scores(monkeypatch, compiled) -> None:
    if not compiled:
        monkeypatch.setattr(quantiles, "native_library", lambda: None)
    values, scales = scaled_sample(torch.bfloat16)
    values[9, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        counted(values)
    values[9, 4] = float("inf")  # inf * 0 in the channel scaled by 0 is NaN; elsewhere inf is a score
    with pytest.raises(ValueError, match="NaN"):
        counted(values).quantiles(np.where(np.arange(40) == 4, 0, scales).astype(np.float32), [0.5])
    scored = (values.abs().float() * torch.from_numpy(scales)).numpy()
    qs = [0.5, 0.999, 1.0]  # the top rank is inf, where numpy's interpolation gives what it gives
    np.testing.assert_array_equal(counted(values).quantiles(scales, qs), percentile(scored, qs))


def test_channel_magnitude_counts_refuse_other_shapes_and_dtypes() -> None:
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        quantiles.ChannelMagnitudeCounts(4, torch.float32)
    counts = quantiles.ChannelMagnitudeCounts(4, torch.float16)
    for chunk in (torch.zeros(3, 5, dtype=torch.float16), torch.zeros(3, 4, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match=r"\[rows, 4\]"):
            counts.add(chunk)
    with pytest.raises(ValueError, match="4 scales"):
        counts.quantiles(np.ones(3, np.float32), [0.5])
    for scale in (-1.0, np.nan):
        with pytest.raises(ValueError, match="non-negative"):
            counts.quantiles(np.float32([1, scale, 1, 1]), [0.5])
