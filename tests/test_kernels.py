"""Sparse decoding against independent references: the masked dense model (hooks), a float64
numpy FFN, and the untouched model before sparsifying."""

from __future__ import annotations

from collections import Counter
from functools import cache

import numpy as np
import pytest
import torch

from actsparse import kernels
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.hooks import apply_thresholds, capture
from actsparse.kernels import (
    KERNELS,
    Decoded,
    DenseLinear,
    GatedWeights,
    NativeKernel,
    NativeLinearKernel,
    SparseGatedMLP,
    SparseInputLinear,
    TorchKernel,
    TorchLinearKernel,
    decode_speed,
    greedy_decode,
    make_kernel,
    make_linear_kernel,
    module_tolerance,
    native_library,
    sparse_vs_masked,
    sparsify_for_decode,
    weight_bytes_bound,
)
from actsparse.models import TINY_FAMILIES, tiny_model

GATED = ("llama", "mistral", "qwen2", "phi3", "gemma")
SPARSITIES = (0.0, 0.3, 0.5, 0.9)
PROMPT = torch.tensor([256, *b"The cat sat on the mat."])
STEPS = 6


@cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family, seed=1)


@cache
def _abs_values(family: str, component: str) -> dict[int, np.ndarray]:
    """|component| of every layer over the prompt, the calibration data of these tests."""
    values: dict[int, np.ndarray] = {}
    model = _model(family)
    with capture(model, [component], lambda layer, _, v: values.__setitem__(layer, v.abs().flatten().numpy())):
        model(PROMPT[None])
    return values


def percentiles(family: str, components: tuple[str, ...], sparsity: float) -> dict:
    """One magnitude threshold per (layer, component): CATS on ``act``, TEAL on the inputs."""
    return {
        (layer, component): float(np.percentile(v, 100 * sparsity))
        for component in components
        for layer, v in _abs_values(family, component).items()
    }


def cats(family: str, sparsity: float) -> dict:
    return percentiles(family, ("act",), sparsity)


def _decode_masked(model, thresholds, kv_dense: bool = False) -> Decoded:
    with apply_thresholds(model, thresholds, kv_dense=kv_dense):
        return greedy_decode(model, PROMPT, STEPS)


def _assert_same_decode(got, ref) -> None:
    assert torch.equal(got.ids, ref.ids)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", GATED)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_sparse_decode_equals_masked_dense(family, sparsity, kernel):
    model = _model(family)
    thresholds = cats(family, sparsity)
    ref = _decode_masked(model, thresholds)
    with sparsify_for_decode(model, thresholds, break_even=1.0, kernel=kernel) as handle:
        got = greedy_decode(model, PROMPT, STEPS)
    _assert_same_decode(got, ref)
    layers = len(thresholds)
    assert handle.paths() == {"prefill": layers, "sparse": layers * (STEPS - 1)}
    assert handle.active_fraction() == pytest.approx(1 - sparsity, abs=0.2)


@pytest.mark.parametrize("family", GATED)
def test_channel_thresholds_equal_masked_dense(family):
    """CHESS: one threshold per channel, some so high that a channel is always off."""
    model = _model(family)
    channels = decoder_layers(model)[0].get_submodule(anatomy_of(model).down).in_features
    generator = torch.Generator().manual_seed(0)
    thresholds = {key: torch.rand(channels, generator=generator) * 2 * t for key, t in cats(family, 0.5).items()}
    with sparsify_for_decode(model, thresholds, break_even=1.0) as handle:
        got = greedy_decode(model, PROMPT, STEPS)
    _assert_same_decode(got, _decode_masked(model, thresholds))
    assert handle.paths()["sparse"] == len(thresholds) * (STEPS - 1)


TEAL_INPUTS = ("ffn_in", "h", "attn_in", "o_in")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_sparse_inputs_of_all_projections_equal_masked_dense(family, kernel):
    """TEAL: every projection of every family, fused ones (Phi-3's qkv and gate_up) included."""
    model = _model(family)
    thresholds = percentiles(family, TEAL_INPUTS, 0.5)
    projections = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    ref = _decode_masked(model, thresholds)
    with sparsify_for_decode(model, thresholds, break_even=1.0, kernel=kernel) as handle:
        got = greedy_decode(model, PROMPT, STEPS)
    _assert_same_decode(got, ref)
    assert sorted(id(m.original[0]) for m in handle.modules) == sorted(map(id, projections))  # each once
    assert handle.paths() == {"prefill": len(handle.modules), "sparse": len(handle.modules) * (STEPS - 1)}
    assert handle.active_fraction() == pytest.approx(0.5, abs=0.2)
    assert dict(model.named_parameters()).keys() == dict(_model(family).named_parameters()).keys()


def test_projections_of_one_input_share_one_kernel_call_a_token():
    """q, k and v (attn_in) and gate and up (ffn_in) each run as one kernel step per token, whose
    slices equal each projection's own masked dense output; a layouts' copy is counted once."""
    model = _model("qwen2")
    thresholds = percentiles("qwen2", TEAL_INPUTS, 0.5)
    with sparsify_for_decode(model, thresholds, break_even=1.0, kernel="native") as handle:
        kernels = {id(m.kernel): m.kernel for m in handle.modules}
        calls = {key: 0 for key in kernels}
        for key, kernel in kernels.items():
            def counted(*args, key=key, step=kernel.step):
                calls[key] += 1
                return step(*args)
            kernel.step = counted
        greedy_decode(model, PROMPT, STEPS)
        extra = handle.extra_bytes()
    layers = len(decoder_layers(model))
    assert len(kernels) == 4 * layers  # attn_in (q, k, v), o_in, ffn_in (gate, up), h
    assert set(calls.values()) == {STEPS - 1}  # once per single-token step, whoever asked first
    assert extra == sum(m.weight.numel() * 4 for m in handle.modules)  # each transposed weight once


def test_a_member_given_another_input_computes_it_afresh():
    """A projection never returns an output its group computed for a different tensor."""
    model = _model("qwen2")
    thresholds = {(0, "attn_in"): 0.1}
    attention = decoder_layers(model)[0].self_attn
    x1, x2 = torch.randn(1, 1, model.config.hidden_size), torch.randn(1, 1, model.config.hidden_size)
    with torch.inference_mode(), sparsify_for_decode(model, thresholds, break_even=1.0):
        q1, k2, v2, k1 = attention.q_proj(x1), attention.k_proj(x2), attention.v_proj(x2), attention.k_proj(x1)
        for got, module, x in ((q1, attention.q_proj, x1), (k2, attention.k_proj, x2),
                               (v2, attention.v_proj, x2), (k1, attention.k_proj, x1)):
            torch.testing.assert_close(got, module.masked_dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_chess_plus_sparsifies_q_and_o_inputs_and_keeps_k_v_dense(family):
    model = _model(family)
    thresholds = cats(family, 0.5) | percentiles(family, ("attn_in", "o_in"), 0.5)
    ref = _decode_masked(model, thresholds, kv_dense=True)
    with sparsify_for_decode(model, thresholds, break_even=1.0, kv_dense=True) as handle:
        got = greedy_decode(model, PROMPT, STEPS)
        replaced = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m in handle.modules})
    _assert_same_decode(got, ref)
    assert replaced == ["mlp", "o_proj", "q_proj"]
    agreement = sparse_vs_masked(model, thresholds, PROMPT, STEPS, kv_dense=True)
    assert agreement.max_logit_diff < 1e-4 and agreement.tokens_matched == agreement.tokens_checked == STEPS
    with sparsify_for_decode(model, thresholds, break_even=1.0):  # k and v sparse too: another model
        all_sparse = greedy_decode(model, PROMPT, STEPS)
    assert (all_sparse.logits - ref.logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="share"):
        sparsify_for_decode(_model("phi3"), percentiles("phi3", ("attn_in",), 0.5), kv_dense=True)


@pytest.mark.parametrize("family", GATED)
@pytest.mark.parametrize("sparsity, break_even", [(0.0, None), (0.3, 0.6)])
def test_fallback_at_low_sparsity_equals_masked_dense(family, sparsity, break_even):
    model = _model(family)
    thresholds = cats(family, sparsity)
    with sparsify_for_decode(model, thresholds, break_even) as handle:
        got = greedy_decode(model, PROMPT, STEPS)
    _assert_same_decode(got, _decode_masked(model, thresholds))
    assert handle.active_fraction() > 0.6
    assert handle.paths()["fallback"] == len(thresholds) * (STEPS - 1)
    assert handle.paths()["sparse"] == 0


@pytest.mark.parametrize("kernel, expected", [("auto", NativeKernel), ("native", NativeKernel), ("torch", TorchKernel)])
def test_break_even_defaults_to_the_kernels_own(kernel, expected):
    with sparsify_for_decode(_model("llama"), cats("llama", 0.5), kernel=kernel) as handle:
        assert {(type(m.kernel), m.break_even) for m in handle.modules} == {(expected, expected.break_even)}


def test_paths_follow_break_even():
    model = _model("llama")
    thresholds = cats("llama", 0.5)
    with sparsify_for_decode(model, thresholds, break_even=0.0) as handle:
        greedy_decode(model, PROMPT, STEPS)
    assert handle.paths()["sparse"] == 0
    with sparsify_for_decode(model, thresholds, break_even=0.9) as handle:
        greedy_decode(model, PROMPT, STEPS)
    assert handle.paths()["fallback"] == 0


def test_batched_single_tokens_run_dense_masked():
    """Rows of a batch have different active channels: that step must not take the sparse path."""
    model = _model("llama")
    thresholds = cats("llama", 0.5)
    batch = torch.stack([PROMPT[:1], PROMPT[1:2]])
    with apply_thresholds(model, thresholds), torch.inference_mode():
        ref = model(batch).logits
    with sparsify_for_decode(model, thresholds, break_even=1.0) as handle, torch.inference_mode():
        got = model(batch).logits
    assert torch.equal(got, ref)
    assert handle.paths() == {"prefill": len(thresholds)}


@pytest.mark.parametrize("family", GATED)
def test_remove_restores_bit_identical_dense(family):
    model = _model(family)
    before = greedy_decode(model, PROMPT, STEPS)
    layers = decoder_layers(model)
    originals = [layer.mlp for layer in layers]
    keys = list(model.state_dict())
    weights = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    handle = sparsify_for_decode(model, {(i, "act"): t for (i, _), t in cats(family, 0.9).items() if i != 1})
    assert layers[1].mlp is originals[1]  # a layer without a threshold stays as it was
    assert list(model.state_dict()) == keys
    sparse = greedy_decode(model, PROMPT, STEPS)
    assert not torch.equal(sparse.logits, before.logits)
    handle.remove()
    assert all(layer.mlp is original for layer, original in zip(layers, originals))
    for name, p in model.named_parameters():
        assert p.data_ptr() == weights[name][0] and torch.equal(p, weights[name][1])
    assert torch.equal(greedy_decode(model, PROMPT, STEPS).logits, before.logits)
    handle.attach()  # the same sparse modules again, then dense again
    assert torch.equal(greedy_decode(model, PROMPT, STEPS).logits, sparse.logits)
    handle.remove()
    assert torch.equal(greedy_decode(model, PROMPT, STEPS).logits, before.logits)


def _numpy_ffn(w: dict[str, np.ndarray], x: np.ndarray, a: np.ndarray, index: np.ndarray) -> np.ndarray:
    h = a * (w["up"][index] @ x + w["up_bias"][index])
    return w["down"][:, index] @ h + w["down_bias"]


def _random_ffn(rng, channels: int, hidden: int, dtype=torch.float32) -> tuple[dict, GatedWeights]:
    w = {
        "up": rng.standard_normal((channels, hidden)),
        "up_bias": rng.standard_normal(channels),
        "down": rng.standard_normal((hidden, channels)),
        "down_bias": rng.standard_normal(hidden),
    }
    t = {k: torch.tensor(v, dtype=dtype) for k, v in w.items()}
    return w, GatedWeights(t["up"], None, t["up"], t["up_bias"], t["down"], t["down_bias"])


KERNEL_CASES = [  # (kernel, hidden): the C loops step 8 floats; 13 and 21 leave a tail, 64 none
    *((lambda w: TorchKernel(w, chunk_bytes), 24) for chunk_bytes in (1, 24 * 4 * 7, 1 << 20)),
    (NativeKernel, 13),
    (NativeKernel, 21),
    (NativeKernel, 64),
]


@pytest.mark.parametrize("build", [TorchKernel, NativeKernel])
@pytest.mark.parametrize("per_channel", [False, True])
def test_step_keeps_what_the_mask_keeps(build, per_channel):
    """Zeros go (they add nothing), ``|a| == t`` stays, and NaN stays (``|NaN| < t`` is false):
    the active count and the output (numpy over the kept channels) say which were kept."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal(50).astype(np.float32)
    a[[3, 11]] = [0.0, -0.5]
    t = rng.uniform(0, 1.5, 50).astype(np.float32) if per_channel else np.float32(0.5)
    if per_channel:
        t[11] = 0.5
    keep = np.flatnonzero(~(np.abs(a) < t) & (a != 0))
    assert 0 < len(keep) < 50 and 11 in keep and 3 not in keep
    w, weights = _random_ffn(rng, 50, 8)
    x = rng.standard_normal(8).astype(np.float32)
    kernel = build(weights)
    y, k = kernel.step(torch.tensor(x), torch.tensor(a), torch.tensor(t), max_active=50)
    assert k == len(keep)
    np.testing.assert_allclose(y.numpy(), _numpy_ffn(w, x, a[keep], keep), rtol=1e-4, atol=1e-4)
    a[7] = np.nan
    assert kernel.step(torch.tensor(x), torch.tensor(a), torch.tensor(t), max_active=50)[1] == len(keep) + (7 not in keep)


@pytest.mark.parametrize("build, hidden", KERNEL_CASES)
def test_step_is_select_then_ffn_and_stops_above_max_active(build, hidden):
    """``step`` (one C call in the native kernel) against the numpy FFN over the channels the
    mask keeps; one more active channel than ``max_active`` gives no output, but the count."""
    rng = np.random.default_rng(hidden + 1)
    channels = 40
    w, weights = _random_ffn(rng, channels, hidden)
    x, a = rng.standard_normal(hidden).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    t = np.float32(0.6)
    keep = np.flatnonzero(np.abs(a) >= t)
    kernel, as32 = build(weights), lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    for _ in range(2):  # the native kernel's scratch is reused
        y, k = kernel.step(as32(x), as32(a), as32(t), max_active=len(keep))
        assert k == len(keep)
        np.testing.assert_allclose(y.numpy(), _numpy_ffn(w, x, a[keep], keep), rtol=1e-4, atol=1e-4)
    assert kernel.step(as32(x), as32(a), as32(t), max_active=len(keep) - 1) == (None, len(keep))


def test_native_kernels_give_the_same_bits_on_any_thread_count(monkeypatch):
    """The C products split the active rows into fixed parts summed in order (FFN, projections),
    or a wide projection's output columns at multiples of the vector width, so every output
    element is computed by the same instructions: 1, 2 and 3 threads agree bit for bit, on shapes
    that leave tails everywhere, by parts and by columns; and each part holds several groups of
    rows read side by side (each from its own stretch of the part), checked against numpy."""
    rng = np.random.default_rng(9)
    channels, hidden = 1203, 75  # ~920 active: ~57 a part, 7 groups of 8 and a tail
    w, weights = _random_ffn(rng, channels, hidden)
    x, a = torch.tensor(rng.standard_normal(hidden), dtype=torch.float32), torch.tensor(rng.standard_normal(channels), dtype=torch.float32)
    t = torch.tensor(0.3)
    ffn, by_parts = NativeKernel(weights), NativeLinearKernel(weights.down, weights.down_bias)
    monkeypatch.setattr(kernels, "COLUMN_SPLIT_OUT", hidden - 1)  # an output this wide splits by columns
    by_columns = NativeLinearKernel(weights.down, weights.down_bias)
    assert (by_parts._parts, by_columns._parts) == (kernels.PARTS, 0)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append([ffn.step(x, a, t, channels)[0], *(k.step(a, t, channels)[0] for k in (by_parts, by_columns))])
    finally:
        torch.set_num_threads(before)
    assert all(y is not None for ys in outputs for y in ys)
    for ys in outputs[1:]:
        assert all(torch.equal(y, y0) for y, y0 in zip(ys, outputs[0]))
    keep = (a.abs() >= t).nonzero().view(-1).numpy()
    np.testing.assert_allclose(outputs[0][0].numpy(), _numpy_ffn(w, x.double().numpy(), a.double().numpy()[keep], keep),
                               rtol=1e-4, atol=1e-3)
    for linear_y in outputs[0][1:]:
        np.testing.assert_allclose(linear_y.numpy(), w["down"][:, keep] @ a.double().numpy()[keep] + w["down_bias"],
                                   rtol=1e-4, atol=1e-3)


def test_native_kernel_rejects_input_it_would_misread():
    _, weights = _random_ffn(np.random.default_rng(3), 8, 16)
    kernel = NativeKernel(weights)
    with pytest.raises(TypeError, match="float32 x, activations and threshold"):
        kernel.step(torch.ones(16), torch.ones(8), torch.ones(1, dtype=torch.float64), 8)
    with pytest.raises(TypeError, match="threshold torch.float32 \\[3\\]"):
        kernel.step(torch.ones(16), torch.ones(8), torch.ones(3), 8)  # neither scalar nor per channel


def test_torch_kernel_bfloat16():
    rng = np.random.default_rng(1)
    w, weights = _random_ffn(rng, 32, 16, torch.bfloat16)
    x, a, index = rng.standard_normal(16), rng.standard_normal(5), np.array([0, 3, 4, 20, 31])
    bf = lambda v: torch.tensor(v, dtype=torch.bfloat16)  # noqa: E731
    got = make_kernel(weights)(bf(x), bf(a), torch.tensor(index)).float().numpy()
    np.testing.assert_allclose(got, _numpy_ffn(w, x, a, index), rtol=0.05, atol=0.2)


def test_auto_kernel_is_native_for_float32_and_torch_without_a_compiler(monkeypatch, caplog):
    _, weights = _random_ffn(np.random.default_rng(2), 8, 16)
    assert isinstance(make_kernel(weights), NativeKernel)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native_library.cache_clear()
    try:
        assert native_library() is None
        assert isinstance(make_kernel(weights), TorchKernel)
        assert "compiling the C sparse decode kernel failed" in caplog.text
        with pytest.raises(ValueError, match="C compiler and float32"):
            NativeKernel(weights)
    finally:
        native_library.cache_clear()
    with pytest.raises(ValueError, match="unknown sparse decode kernel 'cuda'"):
        make_kernel(weights, "cuda")


def test_off_the_cpu_auto_picks_the_pytorch_kernels_with_their_layouts_on_the_weights_device():
    """(meta stands in for a GPU: any device but the CPU)"""
    up, weight = torch.empty(4, 8, device="meta"), torch.empty(6, 8, device="meta")
    kernel = make_kernel(GatedWeights(up, None, up, None, up.t(), None))
    assert isinstance(kernel, TorchKernel) and kernel.down_rows.device.type == kernel.scratch.device.type == "meta"
    assert kernel.down_rows.shape == (4, 8) and kernel.down_rows.is_contiguous()
    linear = make_linear_kernel(weight, None)
    assert isinstance(linear, TorchLinearKernel) and linear.rows.device.type == "meta" and linear.rows.shape == (8, 6)
    with pytest.raises(ValueError, match="float32 on CPU"):
        make_kernel(GatedWeights(up, None, up, None, up.t(), None), "native")
    with pytest.raises(ValueError, match="float32 on CPU"):
        make_linear_kernel(weight, None, "native")


def test_decode_speed_reports_every_side_and_restores_model():
    model = _model("mistral")
    mlps = [layer.mlp for layer in decoder_layers(model)]
    linears = dict(_linears(model))
    speed = decode_speed(model, cats("mistral", 0.5), PROMPT, new_tokens=9, repeats=2)
    assert set(speed) == {"dense_tps", "sparse_tps", "speedup", "kernel_dense_tps", "kernel_speedup", "native_dense_tps",
                          "native_speedup", "fair_speedup", "bound", "active_fraction", "native_dense_gbps"}
    # the steps keeping every channel are counted apart: the active fraction is the sparse steps'
    assert 1 < speed["bound"] < 2 and 0.4 < speed["active_fraction"] < 0.6
    assert speed["dense_tps"] > 0 and speed["sparse_tps"] > 0 and speed["kernel_dense_tps"] > 0
    assert speed["speedup"] == pytest.approx(speed["sparse_tps"] / speed["dense_tps"])
    assert speed["kernel_speedup"] == pytest.approx(speed["sparse_tps"] / speed["kernel_dense_tps"])
    assert speed["native_speedup"] == pytest.approx(speed["sparse_tps"] / speed["native_dense_tps"])
    assert speed["fair_speedup"] == min(speed["speedup"], speed["kernel_speedup"], speed["native_speedup"])
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    attention = 2 * config.hidden_size * head_dim * (config.num_attention_heads + config.num_key_value_heads)
    step_bytes = 4 * (config.num_hidden_layers * (attention + 3 * config.hidden_size * config.intermediate_size)
                      + config.vocab_size * config.hidden_size)  # float32 q, k, v, o, gate, up, down; lm_head
    assert speed["native_dense_gbps"] == pytest.approx(speed["native_dense_tps"] * step_bytes / 1e9)
    assert [layer.mlp for layer in decoder_layers(model)] == mlps and dict(_linears(model)) == linears
    with pytest.raises(ValueError, match="new_tokens >= 5"):
        decode_speed(model, cats("mistral", 0.5), PROMPT, new_tokens=4)


def test_decode_speed_warns_of_a_speedup_above_its_bound(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "weight_bytes_bound", lambda model, handle: 0.01)
    decode_speed(_model("mistral"), cats("mistral", 0.5), PROMPT, new_tokens=5, repeats=1)
    assert "exceeds its weight-bytes bound 0.010" in caplog.text and "GB/s" in caplog.text


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module standing where an ``nn.Linear`` may stand, in model order."""
    kinds = (torch.nn.Linear, DenseLinear, SparseInputLinear)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]


def test_dense_product_equals_float64_and_gives_the_same_bits_on_any_thread_count(monkeypatch):
    """The C matvec against numpy in float64, on shapes leaving tails of the 8-row groups and of
    the 8-float vectors, with and without a bias; 1, 2 and 3 threads agree bit for bit. Outputs
    ``WIDE_OUTPUT`` times wider than the input (the last two shapes) are read transposed. What it
    does not take (several tokens, another dtype of weight or token, a non-contiguous weight) is
    ``F.linear``'s, and the C functions are called for the float32 tokens only."""
    rng = np.random.default_rng(12)
    lib, calls = native_library(), []
    for name in ("dense_matvec", "dense_matvec_rows"):
        function = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *args, name=name, function=function: calls.append(name) or function(*args))
    before = torch.get_num_threads()
    for out, inputs in [(203, 75), (8, 64), (5, 3), (16 * 75, 75), (501, 13)]:
        w, x, b = rng.standard_normal((out, inputs)), rng.standard_normal(inputs), rng.standard_normal(out)
        weight, x32, bias = (torch.tensor(v, dtype=torch.float32) for v in (w, x, b))
        for with_bias in (bias, None):
            expected = w @ x + (b if with_bias is not None else 0)
            outputs = []
            try:
                for threads in (1, 2, 3):
                    torch.set_num_threads(threads)
                    outputs.append(kernels.dense_product(weight, with_bias)(x32.view(1, 1, -1)))
            finally:
                torch.set_num_threads(before)
            assert outputs[0].shape == (1, 1, out)
            assert all(torch.equal(y, outputs[0]) for y in outputs[1:])
            np.testing.assert_allclose(outputs[0].view(-1).numpy(), expected, rtol=0, atol=1e-5 * np.abs(w).sum(1).max())
    assert calls == ["dense_matvec"] * 18 + ["dense_matvec_rows"] * 12
    linear = torch.nn.functional.linear
    two_tokens, as64, strided = torch.randn(2, inputs), (x32.double(), weight.double(), bias.double()), torch.randn(inputs, out).t()
    assert torch.equal(kernels.dense_product(weight, bias)(two_tokens), linear(two_tokens, weight, bias))
    assert torch.equal(kernels.dense_product(*as64[1:])(as64[0]), linear(*as64))
    assert torch.equal(kernels.dense_product(strided, bias)(x32), linear(x32, strided, bias))
    assert len(calls) == 30  # none of these reached the C functions


@pytest.mark.parametrize("components", [("act",), TEAL_INPUTS])
def test_every_other_linear_runs_on_the_dense_product_while_sparsified(components):
    """With the native kernels, every projection no threshold feeds and the lm_head stand in as
    ``DenseLinear`` (state_dict unchanged) while attached; ``attach_dense`` puts them alone in
    every slot (nothing skipped: the dense model's logits); ``remove`` restores the original
    objects. With the PyTorch kernel nothing else is swapped."""
    model = _model("qwen2")
    originals, keys = dict(_linears(model)), list(model.state_dict())
    dense = greedy_decode(model, PROMPT, 4)
    with sparsify_for_decode(model, percentiles("qwen2", components, 0.5)) as handle:
        attached = dict(_linears(model))
        assert isinstance(model.get_output_embeddings(), DenseLinear) and list(model.state_dict()) == keys
        kinds = {name: type(m) for name, m in attached.items()}
        assert (SparseInputLinear in kinds.values()) == (components == TEAL_INPUTS)
        # an nn.Linear left only inside a sparse MLP, which reads its weights itself
        assert all(isinstance(model.get_submodule(name.rpartition(".")[0]), SparseGatedMLP)
                   for name, kind in kinds.items() if kind is torch.nn.Linear)
        assert (torch.nn.Linear in kinds.values()) == (components == ("act",))
        handle.attach_dense()
        assert all(isinstance(m, DenseLinear) for m in dict(_linears(model)).values())
        assert not any(isinstance(m, SparseGatedMLP) for m in model.modules())
        native_dense = greedy_decode(model, PROMPT, 4)
    assert dict(_linears(model)) == originals
    torch.testing.assert_close(native_dense.logits, dense.logits, rtol=0, atol=1e-5)
    with sparsify_for_decode(model, cats("qwen2", 0.5), kernel="torch"):
        assert not any(isinstance(m, DenseLinear) for m in model.modules())


@pytest.mark.parametrize("family, components", [("llama", ("act",)), ("qwen2", TEAL_INPUTS)])
def test_keeping_every_channel_runs_the_kernels_over_all_of_them_to_the_dense_output(family, components):
    """The baseline of ``kernel_speedup``: the sparse modules with thresholds of 0 take the kernel
    path on every single-token step, over every channel, and give the dense model's logits; the
    sparse setting and its counts come back untouched."""
    model = _model(family)
    dense = greedy_decode(model, PROMPT, 4)
    with sparsify_for_decode(model, percentiles(family, components, 0.5)) as handle:
        sparse = greedy_decode(model, PROMPT, 4)
        sparse_paths, sparse_active = handle.paths(), handle.active_fraction()
        handle.keep_every_channel(True)
        full = greedy_decode(model, PROMPT, 4)
        assert handle.paths()["sparse"] == handle.paths()["prefill"] * 3 and handle.paths()["fallback"] == 0
        assert handle.active_fraction() == 1
        handle.keep_every_channel(False)
        assert handle.paths() == sparse_paths and handle.active_fraction() == sparse_active < 0.7
    torch.testing.assert_close(full.logits, dense.logits, rtol=0, atol=1e-4)
    assert not torch.allclose(sparse.logits, dense.logits, atol=1e-3)


@pytest.mark.parametrize(
    "family, thresholds, message",
    [
        ("opt", {(0, "act"): 0.1}, "no gated FFN"),
        ("llama", {(0, "up"): 0.1}, "got \\['up'\\]"),
        ("llama", {(0, "act"): 0.1, (0, "h"): 0.1}, "one or the other"),
        ("llama", {(0, "o_in"): torch.ones(7)}, "vector of 64"),
        ("llama", {(3, "act"): 0.1}, "out of range"),
        ("llama", {(0, "act"): torch.ones(7)}, "vector of 128"),
        ("llama", {(0, "act"): -1.0}, ">= 0"),
    ],
)
def test_bad_input_fails_early_and_names_it(family, thresholds, message):
    model = _model(family)
    with pytest.raises(ValueError, match=message):
        sparsify_for_decode(model, thresholds)
    assert not any(isinstance(m, (SparseGatedMLP, SparseInputLinear)) for m in model.modules())


@pytest.mark.parametrize("options, message", [({"break_even": 1.5}, "break_even"), ({"kernel": "fast"}, "'fast'")])
def test_bad_options_fail_and_leave_the_model_dense(options, message):
    model = _model("llama")
    with pytest.raises(ValueError, match=message):
        sparsify_for_decode(model, cats("llama", 0.5), **options)
    assert not any(isinstance(m, (SparseGatedMLP, SparseInputLinear)) for m in model.modules())


def test_sparse_vs_masked_is_small_and_refuses_a_kernel_computing_something_else(monkeypatch):
    model = _model("llama")
    agreement = sparse_vs_masked(model, cats("llama", 0.5), PROMPT, STEPS)
    assert agreement.tokens_matched == agreement.tokens_checked == agreement.forced_tokens_matched == STEPS
    assert agreement.max_logit_diff < 1e-4 and agreement.max_module_diff <= module_tolerance(torch.float32)
    select = TorchKernel.select
    # a kernel that inflates the FFN output, and one that drops the weakest active channel: the
    # second changes no greedy token here (logits move by ~1e-2), so only the per-module
    # comparison catches it
    def inflate(self, a, threshold):
        values, index = select(self, a, threshold)
        return values * 1e4, index

    def drop_weakest(self, a, threshold):
        values, index = select(self, a, threshold)
        kept = values.abs() > values.abs().min()
        return values[kept], index[kept]

    for wrong in (inflate, drop_weakest):
        monkeypatch.setattr(TorchKernel, "select", wrong)
        with pytest.raises(AssertionError, match="differs from the masked dense computation"):
            sparse_vs_masked(model, cats("llama", 0.5), PROMPT, 12, kernel="torch")


@torch.inference_mode()
def test_the_masked_reference_thresholds_the_gate_the_sparse_step_computed():
    """The per-module check is exact only if both sides mask the same ``a``: the C matvec's gate
    and PyTorch's differ by rounding, so a channel whose threshold sits exactly at its native
    ``|a|`` is kept by the sparse step and, with PyTorch's gate, dropped by the reference.
    ``masked_dense`` computes the gate on the kernel's dense product, so it keeps it too."""
    model = _model("llama")
    layer, anatomy = decoder_layers(model)[0], anatomy_of(model)
    weights, act = GatedWeights.of(layer, anatomy), layer.get_submodule(anatomy.act)
    x = torch.randn(1, 1, weights.gate.shape[1], generator=torch.Generator().manual_seed(3))
    a_native = act(kernels.dense_product(weights.gate, weights.gate_bias)(x)).view(-1)
    a_torch = act(torch.nn.functional.linear(x, weights.gate, weights.gate_bias)).view(-1)
    below = (a_torch.abs() < a_native.abs()).nonzero().view(-1)
    assert len(below), "the two gates round alike on every channel: this input tests nothing"
    threshold = torch.zeros_like(a_native)
    threshold[below[0]] = a_native[below[0]].abs()
    with sparsify_for_decode(model, {(0, "act"): threshold}, break_even=1.0) as handle:
        (mlp,) = handle.modules
        y = mlp(x)
        assert handle.paths()["sparse"] == 1
        torch.testing.assert_close(y, mlp.masked_dense(x), rtol=0, atol=1e-5 * float(y.abs().max()))
        torch_gate_reference = torch.nn.functional.linear(
            kernels._masked(a_torch, threshold) * torch.nn.functional.linear(x, weights.up, weights.up_bias),
            weights.down, weights.down_bias)
        assert float((y - torch_gate_reference).abs().max()) > 1e-3 * float(y.abs().max())


def test_the_masked_reference_decodes_on_the_sparse_steps_dense_engine(monkeypatch):
    """The reference's unmasked products must round as the sparse steps' do, or greedy tokens part
    for rounding alone (on BLAS, a CATS 0.5 decoding of the 1.5B parted after 8 of 16 tokens):
    while it decodes, every linear is a ``DenseLinear`` with the native kernel and PyTorch's own
    with the PyTorch kernel; afterwards the model holds its own linears again."""
    import actsparse.kernels

    model = _model("llama")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    seen = []

    def spy(m, thresholds, kv_dense):
        seen.append(Counter(type(x).__name__ for x in m.modules() if isinstance(x, (torch.nn.Linear, DenseLinear))))
        return apply_thresholds(m, thresholds, kv_dense=kv_dense)

    monkeypatch.setattr(actsparse.kernels, "apply_thresholds", spy)
    for kernel in ("native", "torch"):
        agreement = sparse_vs_masked(model, cats("llama", 0.5), PROMPT, 3, kernel=kernel)
        assert agreement.tokens_matched == 3
    assert seen == [{"DenseLinear": len(linears)}, {"Linear": len(linears)}]
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)] == linears


def test_sparse_vs_masked_reports_where_greedy_tokens_part(monkeypatch, caplog):
    """Exact kernels, but a reference whose tokens part from them (here masked at 0.9 rather than
    0.5, standing in for rounding flips): reported, not raised, and counted from the first token."""
    import actsparse.kernels

    model = _model("llama")
    at_05, at_09 = cats("llama", 0.5), cats("llama", 0.9)
    with sparsify_for_decode(model, at_05, break_even=1.0):
        sparse = greedy_decode(model, PROMPT, 12)
    other = _decode_masked_steps(model, at_09, 12)
    parts = int((sparse.ids != other.ids).nonzero()[0])
    assert parts < 12, "the two thresholds must give other tokens for this test to mean anything"
    monkeypatch.setattr(actsparse.kernels, "apply_thresholds", lambda m, t, kv_dense: apply_thresholds(m, at_09, kv_dense))
    agreement = sparse_vs_masked(model, at_05, PROMPT, 12)
    assert (agreement.tokens_matched, agreement.tokens_checked) == (parts, 12)
    assert agreement.max_module_diff <= module_tolerance(torch.float32)
    # fed the reference's tokens, the model masked at 0.5 chooses, at each step, what one forward
    # over the prompt and those tokens (no cache) gives at that position
    with apply_thresholds(model, at_05), torch.inference_mode():
        full = model(torch.cat([PROMPT, other.ids[:-1]])[None]).logits[0, len(PROMPT) - 1:]
    forced = int((full.argmax(-1) == other.ids).sum())
    assert parts < forced < 12, "the forced count must differ from both ends for this test to mean anything"
    assert agreement.forced_tokens_matched == forced
    differ = (full.argmax(-1) != other.ids).nonzero().flatten().tolist()
    assert f"chose otherwise at step(s) {differ}" in caplog.text


def test_forced_decoding_feeds_the_given_tokens_and_keeps_its_own_choices():
    """Step i's logits are those of one forward over the prompt and forced_ids[:i] (no cache); ids
    are this model's own choices from them."""
    model = _model("qwen2")
    forced_ids = torch.tensor([7, 100, 42, 9, 120])
    decoded = greedy_decode(model, PROMPT, 6, forced_ids=forced_ids)
    with torch.inference_mode():
        full = model(torch.cat([PROMPT, forced_ids])[None]).logits[0, len(PROMPT) - 1:]
    torch.testing.assert_close(decoded.logits, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(decoded.ids, full.argmax(-1)) and not torch.equal(decoded.ids[1:], forced_ids)
    with pytest.raises(ValueError, match="forced_ids"):
        greedy_decode(model, PROMPT, 7, forced_ids=forced_ids)


def _decode_masked_steps(model, thresholds, steps: int) -> Decoded:
    with apply_thresholds(model, thresholds):
        return greedy_decode(model, PROMPT, steps)


def _projection_params(config) -> dict[str, int]:
    """Weights of one decoder layer's projections from the model's config alone."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    return {"attention": attention, "ffn": 3 * hidden * config.intermediate_size,
            "up_down": 2 * hidden * config.intermediate_size}


@pytest.mark.parametrize("method, threshold, skipped", [
    ("cats", 0.0, None), ("cats", float("inf"), "up_down"), ("teal", float("inf"), "all"), ("teal", 0.0, None)])
def test_weight_bytes_bound_counts_the_weights_a_step_reads(method, threshold, skipped):
    """At no zeroed channel the bound is 1; with every channel zeroed it is the dense step's bytes
    over what stays: CATS keeps gate, attention and lm_head; TEAL only the lm_head."""
    model = _model("llama")
    layers, config = len(decoder_layers(model)), model.config
    size = _projection_params(config)
    components = ("act",) if method == "cats" else ("attn_in", "o_in", "ffn_in", "h")
    thresholds = {(layer, c): threshold for layer in range(layers) for c in components}
    with sparsify_for_decode(model, thresholds, break_even=1.0) as handle:
        greedy_decode(model, PROMPT, 3)
    dense = layers * (size["attention"] + size["ffn"]) + config.vocab_size * config.hidden_size
    kept = {None: dense, "up_down": dense - layers * size["up_down"],
            "all": config.vocab_size * config.hidden_size}[skipped]
    assert weight_bytes_bound(model, handle) == pytest.approx(dense / kept)


def test_speed_stage_writes_the_grid_point_and_the_table(tiny_model_dir, tmp_path):
    from actsparse import columns, corpora, methods, models, stages

    model_dir = tiny_model_dir("llama")
    corpus = tmp_path / "evaluation.safetensors"
    corpora.save_corpus(corpus, corpora.tokenize("The cat sat on the mat. " * 8, models.load_tokenizer(model_dir)), {})
    thresholds = tmp_path / "cats-0.50.safetensors"
    methods.save_thresholds(thresholds, cats("llama", 0.5), {"method": "cats", "target_sparsity": 0.5})
    out = tmp_path / "speed" / "0.50.json"
    result = stages.decode_speed(model_dir, corpus, thresholds, out, "cats", 0.5, prompt_tokens=16, new_tokens=5,
                                 repeats=1, kernel="auto", dtype="float32", provenance={"seed": 0})
    assert result["prompt_tokens"] == 16 and result["device"] == "cpu" and result["max_logit_diff"] < 1e-4
    assert result["tokens_matched"] == result["tokens_checked"] == result["forced_tokens_matched"] == 5
    assert result["max_module_diff"] < 1e-4
    assert result["bound"] > 1 and 0.3 < result["active_fraction"] < 0.7
    assert result["dense_tps"] > 0 and result["speedup"] == pytest.approx(result["sparse_tps"] / result["dense_tps"])
    assert result["compiled_logit_diff"] < 1e-5 and result["compiled_speedup"] == pytest.approx(
        result["compiled_sparse_tps"] / result["compiled_dense_tps"])
    table = stages.speed_table([out], tmp_path / "speed.csv")
    assert tuple(table.columns) == columns.SPEED
    assert table.iloc[0].method == "cats" and table.iloc[0].sparsity == 0.5
