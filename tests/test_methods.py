"""Threshold fitting against numpy references on the concatenated shards, and against the sparsity
the fitted thresholds achieve when a tiny model runs over its own calibration tokens."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

from actsparse import hooks, methods
from actsparse.hooks import ZeroCounter, apply_thresholds, capture
from actsparse.methods import (
    GRID,
    METHODS,
    QUANTILE_DEFINITION,
    MissingComponentError,
    ThresholdFileError,
    fit,
    fit_metadata,
    load_grid,
    load_thresholds,
    quantile_mode_difference,
    requirements,
    save_grid,
    save_thresholds,
)
from actsparse.models import tiny_model
from actsparse.stats import array_name
from actsparse.store import ActivationStore, CorpusSlice, StoreWriter, open_store

LEVELS = np.array([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99])
SHARD_TOKENS = (100, 60)  # neither a multiple of the chunk height
LAYERS = (0, 2)
WIDTHS = {"gate": 24, "act": 24, "up": 24, "h": 24, "ffn_in": 16, "attn_in": 16, "o_in": 16}
SEQ_LEN = 20  # per_sample blocks: 5 in the first shard, 3 in the second


def random_values(tokens: int, channels: int, generator: torch.Generator, zeros: float = 0.05) -> torch.Tensor:
    """Heavy-tailed values with exact zeros and a scale that varies by channel."""
    x = torch.randn(tokens, channels, generator=generator) * torch.rand(channels, generator=generator) * 4
    x = x * torch.randn(tokens, channels, generator=generator).exp()
    return torch.where(torch.rand(tokens, channels, generator=generator) < zeros, 0.0, x)


def write_shard(path: Path, values: dict, index: int, start: int, dtype=torch.float16) -> None:
    tokens = len(next(iter(values.values())))
    corpus = CorpusSlice("calibration", index, 2, start, start + tokens)
    with StoreWriter(path, model="test", corpus=corpus, dtype=dtype, token_block=32) as writer:
        for (layer, component), x in values.items():
            writer.append(layer, component, x)


def random_shards(tmp_path: Path, widths: dict = WIDTHS, dtype=torch.float16, edit=None) -> tuple[list[Path], dict]:
    """Two shards (one zarr, one HDF5) and, per key, the float32 values as stored, one array a shard."""
    generator = torch.Generator().manual_seed(0)
    paths, stored, start = [], {}, 0
    for index, (tokens, suffix) in enumerate(zip(SHARD_TOKENS, (".zarr", ".h5"))):
        values = {(layer, c): random_values(tokens, n, generator) for layer in LAYERS for c, n in widths.items()}
        if edit:
            edit(values)
        paths.append(tmp_path / f"shard-{index}{suffix}")
        write_shard(paths[-1], values, index, start, dtype)
        for key, x in values.items():
            stored.setdefault(key, []).append(x.to(dtype).float().numpy())
        start += tokens
    return paths, stored


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[Path], dict]:
    return random_shards(tmp_path_factory.mktemp("shards"))


def percentiles(values: np.ndarray) -> np.ndarray:
    return np.percentile(np.abs(values), 100 * LEVELS)


def chess_scores(act: list[np.ndarray], up: list[np.ndarray], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """T per level and m_c, straight from the formula on the concatenated shards."""
    u = np.concatenate(up).astype(np.float64)
    m = (np.abs(u).sum(axis=0) / len(u)).astype(np.float32)
    if mode == "exact":
        return percentiles(np.concatenate(act) * m), m
    blocks = [a[i : i + SEQ_LEN] for a in act for i in range(0, len(a), SEQ_LEN)]
    return np.mean([percentiles(block * m) for block in blocks], axis=0), m


def chess_reference(act: list[np.ndarray], up: list[np.ndarray], mode: str) -> np.ndarray:
    scores, m = chess_scores(act, up, mode)
    with np.errstate(divide="ignore"):
        t = scores[:, None] / m
    t[LEVELS == 0] = 0
    return t


def stacked(fitted: dict, key) -> np.ndarray:
    return np.stack([fitted[float(s)][key].numpy() for s in LEVELS])


@pytest.mark.parametrize("method, params", [
    ("layer", None), ("layer", {"components": ["act", "o_in"]}), ("cats", None), ("teal", None),
])
def test_magnitude_thresholds_equal_numpy_percentile_of_both_shards(shards, method, params) -> None:
    paths, stored = shards
    fitted = fit(method, paths, LEVELS, params)
    masks = requirements(method, params).masks
    assert set(fitted) == set(LEVELS.tolist())
    for s in LEVELS:
        assert sorted(fitted[float(s)]) == sorted((layer, c) for layer in LAYERS for c in masks)
    for key in fitted[0.5]:
        expected = percentiles(np.concatenate(stored[key]))
        expected[LEVELS == 0] = 0
        got = stacked(fitted, key)
        assert got.dtype == np.float64 and got.shape == (len(LEVELS),)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", ["exact", "per_sample"])
def test_chess_equals_the_formula_on_both_shards(shards, mode) -> None:
    paths, stored = shards
    fitted = fit("chess+", paths, LEVELS, {"quantile_mode": mode, "seq_len": SEQ_LEN})
    for layer in LAYERS:
        expected = chess_reference(stored[layer, "act"], stored[layer, "up"], mode)
        np.testing.assert_array_equal(stacked(fitted, (layer, "act")), expected)
        for component in ("attn_in", "o_in"):
            blocks = [x[i : i + SEQ_LEN] for x in stored[layer, component] for i in range(0, len(x), SEQ_LEN)]
            by_block = np.mean([percentiles(b) for b in blocks], axis=0)
            expected = by_block if mode == "per_sample" else percentiles(np.concatenate(stored[layer, component]))
            expected[LEVELS == 0] = 0
            np.testing.assert_array_equal(stacked(fitted, (layer, component)), expected)


def random_norms(widths: dict, components) -> dict:
    """Column norms per key, one channel of each at 0 (as a weight column of zeros gives)."""
    rng = np.random.default_rng(3)
    norms = {(layer, c): rng.uniform(0.1, 3.0, widths[c]) for layer in LAYERS for c in components}
    for norm in norms.values():
        norm[1] = 0.0
    return norms


def test_wina_thresholds_are_numpy_percentiles_of_the_weighted_scores(shards) -> None:
    paths, stored = shards
    masks = requirements("wina").masks
    norms = random_norms(WIDTHS, masks)
    fitted = fit("wina", paths, LEVELS, column_norms=norms)
    assert masks == ("ffn_in", "h", "attn_in", "o_in") and sorted(fitted[0.5]) == sorted(norms)
    for key, norm in norms.items():
        n = norm.astype(np.float32)
        scores = percentiles(np.concatenate(stored[key]) * n)  # the float32 product, as WINA ranks it
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = scores[:, None] / n.astype(np.float64)
        expected[np.isnan(expected)] = 0  # T = 0 on a zero column: nothing to drop
        expected[LEVELS == 0] = 0
        np.testing.assert_array_equal(stacked(fitted, key), expected)
        assert np.isinf(stacked(fitted, key)[LEVELS >= 0.25, 1]).all()  # a zero column: dropped once T > 0


def test_wina_needs_column_norms_of_every_key(shards) -> None:
    paths, _ = shards
    with pytest.raises(ValueError, match="needs column_norms"):
        fit("wina", paths, [0.5])
    norms = random_norms(WIDTHS, ("ffn_in", "h", "attn_in"))
    with pytest.raises(ValueError, match="layer 0 'o_in' needs 16 column norms, got None"):
        fit("wina", paths, [0.5], column_norms=norms)


def test_chess_is_chess_plus_without_attention(shards) -> None:
    paths, _ = shards
    chess = fit("chess", paths, [0.5])[0.5]
    plus = fit("chess+", paths, [0.5])[0.5]
    assert sorted(chess) == [(layer, "act") for layer in LAYERS]
    for key, t in chess.items():
        assert torch.equal(t, plus[key])


def test_a_channel_whose_up_is_always_zero_is_dropped_exactly_when_T_is_positive(tmp_path) -> None:
    def edit(values):
        for layer in LAYERS:
            values[layer, "up"][:, 3] = 0
            values[layer, "act"][: len(values[layer, "act"]) // 3] = 0  # a third zeros: T = 0 below 1/3

    widths = {"act": 24, "up": 24}
    paths, stored = random_shards(tmp_path, widths, edit=edit)
    fitted = fit("chess", paths, [0.0, 0.2, 0.5])
    for layer in LAYERS:
        assert torch.equal(fitted[0.2][layer, "act"], torch.zeros(24, dtype=torch.float64))
        t = fitted[0.5][layer, "act"].numpy()
        assert t[3] == np.inf and np.isfinite(np.delete(t, 3)).all()
        # the channel rule is "zero a where |a| * m_c < T": both sides zero the same share
        a = np.abs(np.concatenate(stored[layer, "act"]))
        scores, m = chess_scores(stored[layer, "act"], stored[layer, "up"], "exact")
        T = scores[LEVELS == 0.5][0]
        assert m[3] == 0
        assert np.mean(a < t) == np.mean(a * m < T)


def test_bfloat16_stores_fit_the_same_way(tmp_path) -> None:
    paths, stored = random_shards(tmp_path, {"act": 8}, dtype=torch.bfloat16)
    fitted = fit("cats", paths, LEVELS)
    expected = percentiles(np.concatenate(stored[0, "act"]))
    expected[LEVELS == 0] = 0
    np.testing.assert_array_equal(stacked(fitted, (0, "act")), expected)


@pytest.mark.parametrize("pass2_bytes", [None, 1])  # 1: pass 2 sweeps the stores key by key
def test_exact_fitting_reads_each_array_twice_for_all_levels(shards, monkeypatch, pass2_bytes) -> None:
    paths, _ = shards
    levels = np.linspace(0.1, 0.9, 9)
    whole = fit("teal", paths, levels)
    if pass2_bytes:
        monkeypatch.setattr(methods, "_PASS2_BYTES", pass2_bytes)
    reads = Counter()
    iter_chunks = ActivationStore.iter_chunks

    def counted(self, layer, component, rows=None):
        reads[self.path.name, layer, component] += 1
        return iter_chunks(self, layer, component, rows)

    monkeypatch.setattr(ActivationStore, "iter_chunks", counted)
    fitted = fit("teal", paths, levels)
    assert reads == {(p.name, layer, c): 2 for p in paths for layer in LAYERS for c in METHODS["teal"].masks}
    assert all(torch.equal(fitted[s][key], t) for s in whole for key, t in whole[s].items())
    reads.clear()
    fit("chess", paths, [0.3, 0.6], {"quantile_mode": "per_sample", "seq_len": SEQ_LEN})
    assert reads == {(p.name, layer, "act"): 1 for p in paths for layer in LAYERS}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scaled_scores_take_one_read_of_per_channel_counts_or_the_sketchs_two_alike(tmp_path, monkeypatch, dtype) -> None:
    """chess, chess+ and wina rank |x| * s per channel. Where every key's per-channel magnitude
    counts fit the budget, each array is read once; below it, the sketch reads it twice: the
    same thresholds bit for bit (both also equal numpy's, tested above)."""
    paths, _ = random_shards(tmp_path, dtype=dtype)
    norms = random_norms(WIDTHS, requirements("wina").masks)
    reads = Counter()
    iter_chunks = ActivationStore.iter_chunks

    def counted(self, layer, component, rows=None):
        reads[component] += 1
        return iter_chunks(self, layer, component, rows)

    monkeypatch.setattr(ActivationStore, "iter_chunks", counted)
    default = methods._PASS2_BYTES
    for method, scaled in (("chess", "act"), ("chess+", "act"), ("wina", "h")):
        fits = []
        for budget, expected_reads in ((default, 1), (1, 2)):  # 1 byte: no counts fit
            monkeypatch.setattr(methods, "_PASS2_BYTES", budget)
            reads.clear()
            fits.append(fit(method, paths, GRID, column_norms=norms if method == "wina" else None))
            assert reads[scaled] == expected_reads * len(paths) * len(LAYERS), (method, budget)
        for level, thresholds in fits[0].items():
            for key, t in thresholds.items():
                assert torch.equal(t.view(torch.int64), fits[1][level][key].view(torch.int64)), (method, level, key)


def test_quantile_mode_difference_compares_the_two_scores(shards) -> None:
    paths, stored = shards
    rows = quantile_mode_difference(paths, LEVELS, SEQ_LEN)
    assert [(r["layer"], r["target_sparsity"]) for r in rows] == [(l, s) for l in LAYERS for s in LEVELS]
    for layer in LAYERS:
        exact, _ = chess_scores(stored[layer, "act"], stored[layer, "up"], "exact")
        sampled, _ = chess_scores(stored[layer, "act"], stored[layer, "up"], "per_sample")
        mine = [r for r in rows if r["layer"] == layer]
        np.testing.assert_array_equal([r["exact"] for r in mine], exact)
        np.testing.assert_array_equal([r["per_sample"] for r in mine], sampled)
        assert exact[0] == sampled[0] == 0  # the data's exact zeros: equal, so no difference
        relative = [r["relative_difference"] for r in mine]
        assert relative[0] == 0
        np.testing.assert_allclose(relative[1:], np.abs(sampled - exact)[1:] / exact[1:], rtol=1e-15)


def test_non_gated_models_have_no_up_and_chess_uses_unit_scales(tmp_path) -> None:
    assert requirements("layer", gated=False).masks == ("gate", "h")
    assert requirements("chess", gated=False).collect == ("act",)
    assert requirements("chess").collect == ("act", "up")
    with pytest.raises(ValueError, match="non-gated FFN has no 'up'"):
        requirements("layer", {"components": ["up"]}, gated=False)
    paths, _ = random_shards(tmp_path, {"act": 24})
    cats = fit("cats", paths, [0.5])[0.5]
    chess = fit("chess", paths, [0.5], gated=False)[0.5]
    for layer in LAYERS:
        assert torch.equal(chess[layer, "act"], cats[layer, "act"].expand(24))
    with pytest.raises(MissingComponentError, match=r"'chess' needs component 'up'.*shard-0\.zarr"):
        fit("chess", paths, [0.5])


def test_a_gated_model_fitted_as_non_gated_is_refused(shards) -> None:
    with pytest.raises(ValueError, match="the stores hold 'up', so the model is gated"):
        fit("chess", shards[0], [0.5], gated=False)


def test_registry_declares_collection_masks_and_dense_kv() -> None:
    assert set(METHODS) == {"layer", "cats", "chess", "chess+", "teal", "wina"}
    plus = requirements("chess+")
    assert plus.masks == ("act", "attn_in", "o_in") and "up" in plus.collect and plus.kv_dense
    assert not any(requirements(m).kv_dense for m in ("layer", "cats", "chess", "teal"))
    assert requirements("teal").masks == ("ffn_in", "h", "attn_in", "o_in")
    assert requirements("layer", {"components": ["act"]}) == requirements("cats")


@pytest.mark.parametrize("args, error", [
    (("dense", [0.5]), "unknown method 'dense'; known methods: layer, cats, chess, chess\\+, teal, wina"),
    (("cats", [1.0]), r"sparsity levels must lie in \[0, 1\), got \[1.0\]"),
    (("cats", [-0.1, 0.5]), r"got \[-0.1\]"),
    (("cats", [float("nan")]), r"got \[nan\]"),
    (("cats", [True]), r"got \[True\]"),
    (("cats", []), "no sparsity levels"),
    (("cats", [0.5], {"seq_len": 4}), r"'cats' takes no params \['seq_len'\]"),
    (("chess", [0.5], {"quantile_mode": "median"}), "quantile_mode must be one of"),
    (("chess", [0.5], {"quantile_mode": "per_sample"}), "needs seq_len"),
    (("layer", [0.5], {"components": ["acts"]}), "components must be some of"),
])
def test_bad_input_is_named(shards, args, error) -> None:
    method, levels, *params = args
    with pytest.raises(ValueError, match=error):
        fit(method, shards[0], levels, *params)


def test_missing_components_and_stores_are_named(shards, tmp_path) -> None:
    paths, _ = shards
    with pytest.raises(MissingComponentError, match=r"'layer' needs component 'down'"):
        fit("layer", paths, [0.5], {"components": ["down"]})
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        fit("cats", [paths[0], tmp_path / "nowhere.zarr"], [0.5])
    with pytest.raises(ValueError, match="non-empty list of store paths"):
        fit("cats", str(paths[0]), [0.5])


@pytest.mark.parametrize("method, params", [("cats", None), ("chess", {"quantile_mode": "per_sample", "seq_len": 7})])
def test_nan_in_a_store_is_refused_with_its_place(tmp_path, method, params) -> None:
    paths, _ = random_shards(tmp_path, {"act": 8})
    array = zarr.open_group(paths[0], mode="r+")[array_name(2, "act")]
    array[50, 1] = np.float16("nan")  # StoreWriter refuses NaN, so write past it
    with pytest.raises(ValueError, match=r"shard-0\.zarr: layer 2 'act' holds NaN"):
        fit(method, paths, [0.5], params, gated=False)


def test_thresholds_round_trip_with_names_and_metadata(shards, tmp_path) -> None:
    paths, _ = shards
    params = {"quantile_mode": "per_sample", "seq_len": SEQ_LEN}
    thresholds = fit("chess+", paths, [0.5], params)[0.5]
    thresholds[0, "act"][5] = np.inf
    metadata = fit_metadata("chess+", 0.5, paths, params, provenance={"config_hash": "abc"})
    path = tmp_path / "out" / "0.50.safetensors"
    save_thresholds(path, thresholds, metadata)

    loaded, meta = load_thresholds(path)
    assert sorted(loaded) == sorted(thresholds)
    for key, t in thresholds.items():
        assert torch.equal(loaded[key], t)
    assert loaded[0, "o_in"].shape == () and loaded[0, "act"].shape == (24,)
    assert meta == metadata
    assert meta["calibration_tokens"] == sum(SHARD_TOKENS) and meta["quantile_mode"] == "per_sample"
    assert meta["quantile_definition"] == QUANTILE_DEFINITION and meta["method"] == "chess+"
    with open(path, "rb") as file:  # the header as any safetensors reader sees it
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    assert {name for name in header if name != "__metadata__"} == {
        f"layers.{layer}.{c}" for layer in LAYERS for c in ("act", "attn_in", "o_in")
    }
    assert json.loads(header["__metadata__"]["target_sparsity"]) == 0.5
    assert not path.with_name(path.name + ".partial").exists()


def test_a_grid_file_holds_every_level_of_one_fit(shards, tmp_path) -> None:
    paths, _ = shards
    fitted = fit("chess+", paths, GRID)
    path = tmp_path / "grid.safetensors"
    save_grid(path, fitted, fit_metadata("chess+", 0.0, paths))
    for label in ("0.00", "0.37", "0.99"):
        thresholds, metadata = load_grid(path, float(label))
        assert metadata["target_sparsity"] == float(label) and "sparsities" not in metadata
        assert sorted(thresholds) == sorted(fitted[float(label)])
        assert all(torch.equal(t, fitted[float(label)][key]) for key, t in thresholds.items())
    alone = fit("chess+", paths, [0.37])[0.37]  # a level does not depend on the others fitted with it
    assert all(torch.equal(t, fitted[0.37][key]) for key, t in alone.items())
    with pytest.raises(ValueError, match="sparsity 0.375 is not in the grid"):
        load_grid(path, 0.375)
    with pytest.raises(ThresholdFileError, match="not an actsparse.thresholds/1 file"):
        load_thresholds(path)


def test_damaged_or_foreign_threshold_files_are_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no thresholds file"):
        load_thresholds(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ThresholdFileError, match="damaged"):
        load_thresholds(garbage)
    save_file({"layers.0.act": torch.zeros(())}, tmp_path / "foreign.safetensors")
    with pytest.raises(ThresholdFileError, match="not an actsparse.thresholds"):
        load_thresholds(tmp_path / "foreign.safetensors")
    save_thresholds(tmp_path / "ok.safetensors", {(0, "act"): 1.0}, {})
    with pytest.raises(ValueError, match="unknown component"):
        save_thresholds(tmp_path / "bad.safetensors", {(0, "acts"): 1.0}, {})


# Achieved sparsity: a tiny model, its calibration tokens in two shards, one key masked at a time
# (masking one key shifts every later one away from its calibration values).

ACHIEVED_LEVELS = (0.3, 0.5, 0.8)


@pytest.fixture(scope="module")
def model_shards(tmp_path_factory):
    model = tiny_model("llama", seed=0)
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    batches = [ids[:2], ids[2:]]
    components = {c for m in ("cats", "chess", "teal") for c in requirements(m).collect}
    paths, start = [], 0
    for index, batch in enumerate(batches):
        paths.append(tmp_path_factory.mktemp("model") / f"shard-{index}.zarr")
        corpus = CorpusSlice("calibration", index, 2, start, start + batch.numel())
        with StoreWriter(paths[-1], model="tiny-llama", corpus=corpus) as writer:
            with capture(model, components, writer.append), torch.no_grad():
                model(batch)
        start += batch.numel()
    return model, batches, paths


def achieved(model, batches, key, threshold) -> float:
    counter = ZeroCounter()
    with apply_thresholds(model, {key: threshold}, counter=counter), torch.no_grad():
        for batch in batches:
            model(batch)
    return counter.sparsity()[key]


def rounding_allowance(paths, key, threshold: torch.Tensor) -> float:
    """Share of values whose side of the threshold float16 storage may have flipped, plus one rank
    (the linear percentile lies between two neighbouring values)."""
    values = []
    for path in paths:
        with open_store(path) as store:
            values += [chunk.float().abs().numpy() for chunk in store.iter_chunks(*key)]
    a, t = np.concatenate(values), threshold.numpy()
    near = np.abs(a - t) <= np.maximum(a, t) * 2.0**-10 + 2.0**-24
    return near.mean() + 1 / a.size


@pytest.mark.parametrize("method", ["cats", "chess", "teal"])
def test_achieved_sparsity_on_the_calibration_tokens_meets_the_target(model_shards, method) -> None:
    model, batches, paths = model_shards
    fitted = fit(method, paths, ACHIEVED_LEVELS)
    for s in ACHIEVED_LEVELS:
        for key, t in fitted[s].items():
            allowance = rounding_allowance(paths, key, t)
            assert allowance < 0.01
            assert achieved(model, batches, key, t) == pytest.approx(s, abs=allowance), (key, s)


def test_wina_masking_equals_an_independent_hook_on_its_scores(model_shards) -> None:
    """Masking with the fitted per-channel thresholds is WINA's rule ``|x_i| * ||W[:, i]|| < T``
    applied by plain pre-hooks on every projection, T the numpy percentile of the stored scores."""
    model, batches, paths = model_shards
    norms = hooks.input_column_norms(model, requirements("wina").masks)
    fitted = fit("wina", paths, [0.5], column_norms=norms)[0.5]
    consumers = {"ffn_in": ("mlp.gate_proj", "mlp.up_proj"), "h": ("mlp.down_proj",),
                 "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_in": ("self_attn.o_proj",)}
    reference_hooks = []
    for index, component in fitted:
        layer = model.model.layers[index]
        weights = [layer.get_submodule(p).weight.detach() for p in consumers[component]]
        norm = torch.linalg.vector_norm(torch.cat(weights), dim=0)
        values = []
        for path in paths:
            with open_store(path) as store:
                values += [chunk.float().abs() * norm.float() for chunk in store.iter_chunks(index, component)]
        T = float(np.percentile(torch.cat(values).numpy(), 50))

        def keep(module, args, norm=norm, T=T):
            x = args[0]
            return (x * ((x.abs() * norm) >= T),)

        reference_hooks += [layer.get_submodule(p).register_forward_pre_hook(keep) for p in consumers[component]]
    with torch.no_grad():
        expected = [model(batch).logits for batch in batches]
    for handle in reference_hooks:
        handle.remove()
    with apply_thresholds(model, fitted), torch.no_grad():
        got = [model(batch).logits for batch in batches]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
