"""Activation stores: round trips, completion, damage detection and the background writer."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from actsparse.stats import EDGES
from actsparse.store import (
    COMPRESSIONS,
    CorpusSlice,
    StoreError,
    StoreWriter,
    open_store,
    partial_path,
    stats_path,
)

SUFFIXES = [".zarr", ".h5"]
TOKENS, BLOCK = 100, 32  # 4 chunks per array, the last one partial
SLICE = CorpusSlice("c4", shard_index=1, shard_count=4, token_start=100, token_stop=100 + TOKENS)
KEYS = {(0, "gate"): 24, (0, "act"): 24, (2, "o_in"): 16}


def activations(channels: int, seed: int) -> torch.Tensor:
    """float32 values with exact zeros, as a model hands them over before the stored cast."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, channels, generator=generator) * 3
    return torch.where(x.abs() < 1, torch.zeros_like(x), x)


def data() -> dict[tuple[int, str], torch.Tensor]:
    values = {key: activations(channels, seed) for seed, (key, channels) in enumerate(KEYS.items())}
    values[(0, "act")][BLOCK : 2 * BLOCK] = 0  # an all-zero chunk must be stored like any other
    return values


def write(path: Path, values: dict, dtype: torch.dtype = torch.float16, **options) -> None:
    """Append in uneven batches (not multiples of the chunk height), interleaving keys."""
    with StoreWriter(path, model="tiny-llama", corpus=SLICE, dtype=dtype, token_block=BLOCK,
                     provenance={"commit": "abc123"}, **options) as writer:
        for start, stop in [(0, 7), (7, 50), (50, 100)]:
            for (layer, component), x in values.items():
                writer.append(layer, component, x[start:stop])


def read(path: Path, rows: int | None = None) -> dict[tuple[int, str], torch.Tensor]:
    with open_store(path) as store:
        return {key: torch.cat(list(store.iter_chunks(*key, rows=rows))) for key in store.keys()}


def bits(x: torch.Tensor) -> np.ndarray:
    return x.view(torch.int16).numpy()


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_is_bit_exact_in_the_stored_dtype(tmp_path, suffix, dtype, compression) -> None:
    path = tmp_path / f"shard-1{suffix}"
    values = data()
    write(path, values, dtype, compression=compression)

    for rows in (None, 9):
        stored = read(path, rows)
        assert sorted(stored) == sorted(values)
        for key, x in values.items():
            assert stored[key].dtype == dtype
            assert np.array_equal(bits(stored[key]), bits(x.to(dtype)))
    with open_store(path) as store:
        assert store.tokens == TOKENS and store.dtype == dtype and store.corpus == SLICE
        assert store.shape(2, "o_in") == (TOKENS, 16)
        assert store.metadata["model"] == "tiny-llama"
        assert store.metadata["provenance"] == {"commit": "abc123"}
        assert [len(chunk) for chunk in store.iter_chunks(0, "act")] == [32, 32, 32, 4]
    assert not partial_path(path).exists()


def test_both_backends_store_the_same(tmp_path) -> None:
    values = data()
    write(tmp_path / "a.zarr", values, torch.bfloat16)
    write(tmp_path / "a.h5", values, torch.bfloat16)
    zarr_values, h5_values = read(tmp_path / "a.zarr"), read(tmp_path / "a.h5")
    assert all(np.array_equal(bits(zarr_values[k]), bits(h5_values[k])) for k in values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_writer_stats_describe_the_stored_values(tmp_path, dtype) -> None:
    path = tmp_path / "shard-1.zarr"
    write(path, data(), dtype)
    with open_store(path) as store:
        saved = store.stats()
    stored = read(path)
    assert stats_path(path).exists() and list(saved) == sorted(stored)
    for key, x in stored.items():
        magnitudes = np.abs(x.to(torch.float64).numpy())
        got = saved[key]
        assert got.count == magnitudes.size and got.zeros == (magnitudes == 0).sum() > 0
        below_edges = (magnitudes.ravel()[:, None] < EDGES).mean(0)
        np.testing.assert_allclose(got.cdf_at(EDGES), below_edges)
        np.testing.assert_allclose(got.sum_abs, magnitudes.sum(0), rtol=1e-12)


def test_appended_tensors_are_copied_before_the_caller_reuses_them(tmp_path) -> None:
    """A batch already in the stored dtype still has to be copied: the model may overwrite it."""
    path = tmp_path / "s.zarr"
    x = activations(8, seed=6).half()
    buffer = x.clone()
    with StoreWriter(path, model="m", corpus=SLICE, token_block=BLOCK, queue_size=4) as writer:
        for start in range(0, TOKENS, 25):
            buffer.copy_(x)
            writer.append(1, "act", buffer[start : start + 25])
            buffer.fill_(7.0)  # before the writer thread got to it, most likely
    assert np.array_equal(bits(read(path)[(1, "act")]), bits(x))
    with open_store(path) as store:
        assert store.stats()[1, "act"].zeros == (x == 0).sum()


def test_nan_values_fail_the_writer_like_a_write_error(tmp_path) -> None:
    path = tmp_path / "s.h5"
    x = activations(8, seed=7)
    x[60, 3] = float("nan")
    writer = StoreWriter(path, model="m", corpus=SLICE, token_block=BLOCK)
    writer.append(2, "up", x)
    with pytest.raises(StoreError, match="layer 2 up: batch holds 1 NaN values"):
        writer.close()
    assert not path.exists() and not stats_path(path).exists()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_compression_names_a_codec_of_each_backend(tmp_path, suffix) -> None:
    """Exact zeros, as ReLU models give, are what compression saves on; "none" stores raw."""
    sparse = activations(2048, seed=8)
    sparse[sparse.abs() < 5] = 0  # 90% zeros
    sizes = {}
    for compression in COMPRESSIONS:
        path = tmp_path / f"{compression}{suffix}"
        write(path, {(0, "act"): sparse}, compression=compression)
        sizes[compression] = sum(f.stat().st_size for f in [path, *path.rglob("*")] if f.is_file())
    raw = sparse.numel() * 2
    assert sizes["small"] < 0.3 * raw < raw < sizes["none"]
    assert sizes["fast"] < 0.7 * raw if suffix == ".zarr" else sizes["fast"] > raw
    with pytest.raises(ValueError, match="must be one of fast, small, none, got 'gzip'"):
        StoreWriter(tmp_path / f"x{suffix}", model="m", corpus=SLICE, compression="gzip")


def test_three_d_batches_are_flattened_row_major(tmp_path) -> None:
    path = tmp_path / "s.h5"
    x = activations(8, seed=5)
    with StoreWriter(path, model="m", corpus=SLICE, token_block=BLOCK) as writer:
        writer.append(1, "h", x.reshape(4, 25, 8))
    assert np.array_equal(bits(read(path)[(1, "h")]), bits(x.half()))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_interrupted_writer_leaves_nothing_open_store_accepts(tmp_path, suffix) -> None:
    path = tmp_path / f"shard-1{suffix}"
    values = data()
    with pytest.raises(RuntimeError, match="forward pass failed"):
        with StoreWriter(path, model="m", corpus=SLICE, token_block=BLOCK) as writer:
            writer.append(0, "act", values[(0, "act")][:50])
            raise RuntimeError("forward pass failed")

    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(StoreError, match="writer was interrupted"):
        open_store(path)
    os.rename(partial_path(path), path)  # even moved into place by hand it is refused
    with pytest.raises(StoreError, match="no completion marker"):
        open_store(path)
    os.rename(path, partial_path(path))

    write(path, values)  # a rerun deletes the leftover and completes
    assert not partial_path(path).exists()
    assert np.array_equal(bits(read(path)[(0, "act")]), bits(values[(0, "act")].half()))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_close_refuses_keys_short_of_the_token_count(tmp_path, suffix) -> None:
    path = tmp_path / f"shard-1{suffix}"
    writer = StoreWriter(path, model="m", corpus=SLICE, token_block=BLOCK)
    writer.append(0, "act", activations(24, 0)[:60])
    with pytest.raises(StoreError, match="layer 0 act: 60"):
        writer.close()
    assert not path.exists()
    with pytest.raises(StoreError, match="interrupted"):
        open_store(path)


def _delete_zarr_chunk(path: Path) -> None:
    (path / "layers/0/act/c/1/0").unlink()


def _shrink_zarr_array(path: Path) -> None:
    zarr.open_array(path / "layers/0/act", mode="r+").resize((TOKENS - 4, 24))


def _delete_h5_dataset(path: Path) -> None:
    with h5py.File(path, "r+") as file:
        del file["layers/0/act"]


def _truncate_h5_file(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    "suffix, damage, problem",
    [
        (".zarr", _delete_zarr_chunk, r"layers/0/act stores 3 of its 4 chunks"),
        (".zarr", _shrink_zarr_array, r"layers/0/act has shape \[96, 24\], .* records \[100, 24\]"),
        (".h5", _delete_h5_dataset, r"array layers/0/act is missing"),
        (".h5", _truncate_h5_file, r"cannot open as .h5 store"),
    ],
)
def test_damaged_store_is_refused_naming_path_and_problem(
    tmp_path, suffix, damage, problem
) -> None:
    path = tmp_path / f"shard-1{suffix}"
    write(path, data())
    open_store(path).close()
    damage(path)
    with pytest.raises(StoreError, match=problem) as error:
        open_store(path)
    assert str(path) in str(error.value)


def _flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _flip_zarr_chunk(path: Path, chunk: int) -> None:
    chunk_file = path / f"layers/0/act/c/{chunk}/0"
    _flip_byte(chunk_file, chunk_file.stat().st_size // 2)


def _flip_h5_chunk(path: Path, chunk: int) -> None:
    with h5py.File(path, "r") as file:
        info = file["layers/0/act"].id.get_chunk_info(chunk)
    _flip_byte(path, info.byte_offset + info.size // 2)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("suffix, flip", [(".zarr", _flip_zarr_chunk), (".h5", _flip_h5_chunk)])
def test_a_flipped_chunk_is_an_error_naming_store_array_chunk_and_recovery(tmp_path, suffix, flip, compression) -> None:
    path = tmp_path / f"shard-1{suffix}"
    write(path, data(), compression=compression)
    flip(path, 2)
    for rows in (None, 64):  # read chunk by chunk, or two chunks at a time: the same chunk is named
        with open_store(path) as store:
            with pytest.raises(StoreError) as error:
                list(store.iter_chunks(0, "act", rows=rows))
        message = str(error.value)
        assert f"{path} is damaged: array layers/0/act, chunk 2 (tokens 64-95)" in message
        assert f"rm {'-r ' if suffix == '.zarr' else ''}{path}" in message
    with open_store(path) as store:  # the other arrays read back unchanged
        assert np.array_equal(bits(torch.cat(list(store.iter_chunks(0, "gate")))), bits(data()[(0, "gate")].half()))


class DiskFull(OSError):
    pass


def _fail_to_write(*args) -> None:
    raise DiskFull("no space left on device")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_background_error_surfaces_at_the_next_append(tmp_path, suffix, monkeypatch) -> None:
    monkeypatch.setattr(StoreWriter, "_write", _fail_to_write)
    path = tmp_path / f"shard-1{suffix}"
    x = activations(24, 0)
    writer = StoreWriter(path, model="m", corpus=SLICE, token_block=BLOCK, queue_size=1)
    # With one queue slot the thread has taken (and failed on) the first batch before the third
    # append returns, so the fourth append at the latest sees the error.
    with pytest.raises(StoreError, match="no space left on device") as error:
        for start in range(0, 40, 10):
            writer.append(0, "act", x[start : start + 10])
    assert isinstance(error.value.__cause__, DiskFull)
    writer.abort()
    assert not path.exists()


def test_background_error_surfaces_at_close(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(StoreWriter, "_write", _fail_to_write)
    path = tmp_path / "shard-1.zarr"
    writer = StoreWriter(path, model="m", corpus=SLICE, token_block=BLOCK)
    writer.append(0, "act", activations(24, 0))
    with pytest.raises(StoreError, match="no space left on device"):
        writer.close()
    assert not path.exists() and not stats_path(path).exists()


def test_existing_store_needs_overwrite(tmp_path) -> None:
    path = tmp_path / "shard-1.h5"
    write(path, data())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        StoreWriter(path, model="m", corpus=SLICE)
    values = {key: -x for key, x in data().items()}
    write(path, values, overwrite=True)
    assert np.array_equal(bits(read(path)[(0, "gate")]), bits(values[(0, "gate")].half()))


def test_bad_input_fails_early_with_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"end in \.zarr or \.h5"):
        StoreWriter(tmp_path / "s.npy", model="m", corpus=SLICE)
    with pytest.raises(ValueError, match="one of float16, bfloat16, float32"):
        StoreWriter(tmp_path / "s.zarr", model="m", corpus=SLICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="shard index 4 not in"):
        CorpusSlice("c4", 4, 4, 0, 10)
    with StoreWriter(tmp_path / "s.zarr", model="m", corpus=SLICE, token_block=BLOCK) as writer:
        x = activations(24, 0)
        with pytest.raises(ValueError, match="unknown component"):
            writer.append(0, "mlp", x)
        with pytest.raises(ValueError, match="12 channels, earlier ones 24"):
            writer.append(0, "act", x[:5])
            writer.append(0, "act", x[5:10, :12])
        with pytest.raises(ValueError, match="5 \\+ 100 tokens exceed the shard's 100"):
            writer.append(0, "act", x)
        writer.append(0, "act", x[5:])
    with open_store(tmp_path / "s.zarr") as store:
        with pytest.raises(KeyError, match="no layer 3 component 'act'"):
            store.iter_chunks(3, "act")
        with pytest.raises(ValueError, match="rows must be >= 1"):
            store.iter_chunks(0, "act", rows=0)
    with pytest.raises(FileNotFoundError, match="no store at"):
        open_store(tmp_path / "missing.h5")
