"""Storeless calibration: thresholds fitted from live forward passes and the shard summaries are,
bit for bit, the thresholds fitted from the activation stores of the same collection."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from actsparse.anatomy import anatomy_of
from actsparse.collect import collect_shard, shard_slices
from actsparse.methods import GRID, fit, requirements
from actsparse.models import tiny_model
from actsparse.sources import ForwardSource
from actsparse.stats import StoreStats
from actsparse.store import StoreError, open_store, open_summary, stats_path
from conftest import FAMILIES

SEQ, BATCH, BOS = 16, 3, 256  # BOS: the byte tokenizer's bos_token_id (models.bos_id)
LEVELS = (0.0, 0.1, 0.35, 0.5, 0.77, 0.9, 0.99)
METHODS = {  # name -> params; seq_len is the collection's, as the workflow passes it
    "layer": {},
    "cats": {},
    "chess": {"seq_len": SEQ},
    "chess-per-sample": {"quantile_mode": "per_sample", "seq_len": SEQ},
    "chess+": {"seq_len": SEQ},
    "teal": {},
}


def method_of(name: str) -> str:
    return name.removesuffix("-per-sample")


def corpus(tokens: int) -> torch.Tensor:
    return torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(5), dtype=torch.int32)


@cache
def model(family: str) -> torch.nn.Module:
    return tiny_model(family, seed=1)


def components(net: torch.nn.Module) -> list[str]:
    gated = anatomy_of(net).gated
    wanted = {c for name, p in METHODS.items() for c in requirements(method_of(name), p, gated=gated).collect}
    return sorted(wanted)


def collect_both(directory: Path, family: str, dtype: str, shards: int, tokens: int,
                 counted: list[str] | None = None):
    """The same collection twice: HDF5 stores (quicker to open than zarr at this size), and shard
    summaries without stores; as the workflow collects, channel sums only for the components
    read for scales (up) and, unless ``counted`` says otherwise, counts for the masked ones."""
    net, ids = model(family), corpus(tokens)
    needs = [requirements(method_of(name), p, gated=anatomy_of(net).gated) for name, p in METHODS.items()]
    summed = {c for r in needs for c in r.collect if c not in r.masks}
    counted = {c for r in needs for c in r.masks} if counted is None else counted
    stores, summaries = [], []
    for part in shard_slices(len(ids), shards, SEQ):
        for paths, name in ((stores, f"shard-{part.shard_index}.h5"),
                            (summaries, f"shard-{part.shard_index}.stats.safetensors")):
            paths.append(directory / name)
            collect_shard(net, ids, part, paths[-1], components(net), SEQ, BATCH, dtype, {}, "tiny", BOS,
                          summed=summed, counted=counted)
    return net, ids, stores, summaries


def assert_bitwise_equal(stored: dict, storeless: dict) -> None:
    assert sorted(stored) == sorted(storeless)
    for level in stored:
        assert sorted(stored[level]) == sorted(storeless[level])
        for key, t in stored[level].items():
            u = storeless[level][key]
            assert t.dtype == u.dtype == torch.float64 and t.shape == u.shape
            assert torch.equal(t.view(torch.int64), u.view(torch.int64)), (level, key)


def check_every_method(directory: Path, family: str, dtype: str, shards: int, tokens: int) -> dict[str, int]:
    """Fits every method both ways and compares; returns the forwards each storeless fit made."""
    net, ids, stores, summaries = collect_both(directory, family, dtype, shards, tokens)
    gated = anatomy_of(net).gated
    forwards = {}
    for name, params in METHODS.items():
        source = ForwardSource(net, ids, summaries, SEQ, BATCH, BOS)
        storeless = fit(method_of(name), source, LEVELS, params, gated=gated)
        assert_bitwise_equal(fit(method_of(name), stores, LEVELS, params, gated=gated), storeless)
        forwards[name] = source.forwards
    return forwards


@pytest.mark.parametrize("family, dtype, shards", [
    ("llama", "float16", 1),
    ("phi3", "bfloat16", 3),
    ("opt", "float32", 2),
])
def test_storeless_thresholds_equal_stored_ones_bit_for_bit(tmp_path, family, dtype, shards) -> None:
    forwards = check_every_method(tmp_path, family, dtype, shards, tokens=SEQ * 7)
    # 16-bit values: per-layer methods come from the shard summaries alone, CHESS's importance
    # from one pass of per-channel counts; float32 values take the sketch's two passes
    per_layer, scaled = (0, 1) if dtype != "float32" else (2, 2)
    assert forwards["layer"] == forwards["cats"] == forwards["teal"] == per_layer
    assert forwards["chess"] == forwards["chess+"] == scaled
    assert forwards["chess-per-sample"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_storeless_equals_stored_for_every_family_dtype_and_shard_count(tmp_path, family, dtype, shards) -> None:
    check_every_method(tmp_path, family, dtype, shards, tokens=SEQ * 7)


def test_a_key_without_counts_is_fitted_from_the_passes_with_the_same_thresholds(tmp_path) -> None:
    """Summaries that counted act only: teal's keys take the sketch's two passes, cats' none."""
    net, ids, stores, summaries = collect_both(tmp_path, "llama", "float16", 2, SEQ * 3, counted=["act"])
    assert {c for _, c in open_summary(summaries[0]).patterns} == {"act"}
    for method, forwards in (("cats", 0), ("teal", 2)):
        source = ForwardSource(net, ids, summaries, SEQ, BATCH, BOS)
        assert_bitwise_equal(fit(method, stores, LEVELS, {}), fit(method, source, LEVELS, {}))
        assert source.forwards == forwards


def test_only_the_scales_components_keep_channel_sums(tmp_path) -> None:
    _, _, stores, summaries = collect_both(tmp_path, "llama", "float16", 1, SEQ * 2)
    for stats in (StoreStats.load(stats_path(stores[0])), open_summary(summaries[0]).stats):
        assert {c for key in stats if stats[key].sum_abs is not None for c in [key[1]]} == {"up"}


def test_pass_2_takes_a_forward_per_group_of_keys_whose_counts_fit(tmp_path, monkeypatch) -> None:
    """By default every layer's per-channel counts fit at once: one forward for the grid. With a
    tiny budget the sketch takes over, every key with its own pass 2 (one forward each, after
    pass 1's): the same thresholds bit for bit, so the two exact paths agree."""
    net, ids, stores, summaries = collect_both(tmp_path, "llama", "float16", 2, SEQ * 2)
    stored = fit("chess", stores, GRID, {})
    source = ForwardSource(net, ids, summaries, SEQ, BATCH, BOS)
    assert_bitwise_equal(stored, fit("chess", source, GRID, {}))
    assert source.forwards == 1
    monkeypatch.setattr(ForwardSource, "pass2_bytes", 1)
    source = ForwardSource(net, ids, summaries, SEQ, BATCH, BOS)
    assert_bitwise_equal(stored, fit("chess", source, GRID, {}))
    assert source.forwards == 1 + net.config.num_hidden_layers


def test_shard_summaries_hold_the_stores_statistics_and_no_activations(tmp_path) -> None:
    _, _, stores, summaries = collect_both(tmp_path, "mistral", "bfloat16", 2, SEQ * 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in stores] + [stats_path(p).name for p in stores] + [p.name for p in summaries])
    for store, path in zip(stores, summaries):
        stored, summary = StoreStats.load(stats_path(store)), open_summary(path)
        assert list(stored) == list(summary.stats)
        for key in stored:
            assert np.array_equal(stored[key].hist, summary.stats[key].hist)
            assert np.array_equal(stored[key].sum_abs, summary.stats[key].sum_abs)
            assert summary.patterns[key].sum() == stored[key].count
        assert StoreStats.load(path)[key].count == stored[key].count  # the stats tables read it as is


def test_summary_counts_every_stored_magnitude_and_keeps_them_compressed(tmp_path) -> None:
    """Each key's counts are numpy's count of the stored values' bit patterns with the sign
    cleared, read back from a file that holds them compressed (raw: 256 KiB a key)."""
    _, _, stores, summaries = collect_both(tmp_path, "llama", "float16", 1, SEQ * 6)
    summary = open_summary(summaries[0])
    with open_store(stores[0]) as store:
        for layer, component in store.keys():
            values = torch.cat(list(store.iter_chunks(layer, component))).numpy()
            expected = np.bincount((values.view(np.uint16) & 0x7FFF).ravel(), minlength=1 << 15)
            assert np.array_equal(summary.patterns[layer, component], expected), (layer, component)
    raw_counts = len(summary.patterns) * (1 << 15) * 8
    assert summaries[0].stat().st_size < raw_counts / 10


def _rewritten(path: Path, change) -> None:
    """The summary at ``path`` with ``change(tensors, summary_metadata)`` applied, saved again."""
    with safe_open(path, framework="numpy") as file:
        header = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    metadata = json.loads(header["actsparse_summary"])
    change(tensors, metadata)
    save_file(tensors, path, metadata={**header, "actsparse_summary": json.dumps(metadata)})


def _undecodable(tensors: dict, metadata: dict) -> None:
    name = next(n for n in tensors if n.endswith("/magnitude_patterns"))
    tensors[name] = np.frombuffer(b"not blosc at all", np.uint8)


def _too_few_counts(tensors: dict, metadata: dict) -> None:
    name = next(n for n in tensors if n.endswith("/magnitude_patterns"))
    codec = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    tensors[name] = np.frombuffer(codec.encode(np.zeros(100, np.int64)), np.uint8)


def _older_format(tensors: dict, metadata: dict) -> None:
    metadata["format"] = "actsparse.shard-summary/1"


@pytest.mark.parametrize(("change", "message"), [
    (_undecodable, "magnitude counts do not decompress"),
    (_too_few_counts, "100 magnitude counts, expected 32768"),
    (_older_format, "expected 'actsparse.shard-summary/2' .delete it and rerun"),
])
def test_a_damaged_or_older_summary_is_refused_naming_the_file(tmp_path, change, message) -> None:
    _, _, _, summaries = collect_both(tmp_path, "llama", "float16", 1, SEQ * 4)
    open_summary(summaries[0])  # intact: accepted
    _rewritten(summaries[0], change)
    with pytest.raises(StoreError, match=message) as error:
        open_summary(summaries[0])
    assert str(summaries[0]) in str(error.value)


def test_an_interrupted_shard_leaves_no_summary_and_a_foreign_file_is_refused(tmp_path) -> None:
    net, ids = model("llama"), corpus(SEQ * 4)
    part = shard_slices(len(ids), 1, SEQ)[0]
    path = tmp_path / "shard-0.stats.safetensors"
    collect_shard(net, ids, part, path, ["act"], SEQ, BATCH, "float16", {}, "tiny", BOS)
    calls = 0

    def fail(module, args, out):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt

    handle = net.model.layers[0].mlp.register_forward_hook(fail)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect_shard(net, ids, part, path, ["act"], SEQ, BATCH, "float16", {}, "tiny", BOS)
    finally:
        handle.remove()
    assert not path.exists()  # the earlier complete summary is gone too: nothing to mistake
    with pytest.raises(FileNotFoundError, match="no shard summary"):
        ForwardSource(net, ids, [path], SEQ, BATCH, BOS)
    store = tmp_path / "shard-0.zarr"
    collect_shard(net, ids, part, store, ["act"], SEQ, BATCH, "float16", {}, "tiny", BOS)
    with pytest.raises(StoreError, match="not a storeless shard summary"):
        ForwardSource(net, ids, [stats_path(store)], SEQ, BATCH, BOS)


def test_counting_on_the_values_device_gives_the_same_thresholds(tmp_path, monkeypatch) -> None:
    """The PyTorch counting a GPU uses (run here on CPU tensors) equals numpy's, so a storeless fit
    on a GPU returns the stored fit's thresholds."""
    from actsparse import quantiles

    net, ids, stores, summaries = collect_both(tmp_path, "gemma", "bfloat16", 2, SEQ * 4)
    expected = {name: fit(method_of(name), stores, LEVELS, METHODS[name]) for name in ("chess", "chess+")}
    monkeypatch.setattr(quantiles, "_on_device", lambda chunk: isinstance(chunk, torch.Tensor))
    for name, stored in expected.items():
        assert_bitwise_equal(stored, fit(method_of(name), ForwardSource(net, ids, summaries, SEQ, BATCH, BOS),
                                         LEVELS, METHODS[name]))
    values = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        quantiles.QuantileSketch([0.5]).add_pass1(values)
