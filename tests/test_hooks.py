"""Hooks against independent references: plain hooks on literal module paths, manual MLP forwards
and direct counts."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.hooks import ZeroCounter, apply_thresholds, capture, last_fraction
from actsparse.models import tiny_model

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "phi", "opt", "gemma")
GATED = ("llama", "mistral", "qwen2", "phi3", "gemma")
BATCH, SEQ, HIDDEN, FFN = 2, 10, 64, 128

# Where each component is visible, written out per family (independent of the anatomy table):
# component -> [(module path, "in" | "out", half of a fused output or None)]; every point must agree.
_LLAMA_POINTS = {
    "ffn_in": [("mlp.gate_proj", "in", None), ("mlp.up_proj", "in", None)],
    "gate": [("mlp.gate_proj", "out", None)],
    "act": [("mlp.act_fn", "out", None)],
    "up": [("mlp.up_proj", "out", None)],
    "h": [("mlp.down_proj", "in", None)],
    "down": [("mlp.down_proj", "out", None)],
    "attn_in": [("self_attn.q_proj", "in", None), ("self_attn.k_proj", "in", None), ("self_attn.v_proj", "in", None)],
    "o_in": [("self_attn.o_proj", "in", None)],
}


def _non_gated_points(ffn: str, o: str) -> dict[str, list]:
    """phi keeps fc1/fc2 under ``mlp.``, opt directly on the layer."""
    return {
        "ffn_in": [(f"{ffn}fc1", "in", None)],
        "gate": [(f"{ffn}fc1", "out", None)],
        "act": [(f"{ffn}activation_fn", "out", None)],
        "h": [(f"{ffn}fc2", "in", None)],
        "down": [(f"{ffn}fc2", "out", None)],
        "attn_in": _LLAMA_POINTS["attn_in"],
        "o_in": [(o, "in", None)],
    }


POINTS = {
    "llama": _LLAMA_POINTS,
    "mistral": _LLAMA_POINTS,
    "qwen2": _LLAMA_POINTS,
    "gemma": _LLAMA_POINTS,
    "phi3": {
        "ffn_in": [("mlp.gate_up_proj", "in", None)],
        "gate": [("mlp.gate_up_proj", "out", 0)],
        "act": [("mlp.activation_fn", "out", None)],
        "up": [("mlp.gate_up_proj", "out", 1)],
        "h": [("mlp.down_proj", "in", None)],
        "down": [("mlp.down_proj", "out", None)],
        "attn_in": [("self_attn.qkv_proj", "in", None)],
        "o_in": [("self_attn.o_proj", "in", None)],
    },
    "phi": _non_gated_points("mlp.", "self_attn.dense"),
    "opt": _non_gated_points("", "self_attn.out_proj"),
}
CHANNELS = {"ffn_in": HIDDEN, "gate": FFN, "act": FFN, "up": FFN, "h": FFN, "down": HIDDEN, "attn_in": HIDDEN, "o_in": HIDDEN}
LAYERS_PREFIX = {"opt": "model.decoder.layers"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls run ~50x slower when torch's thread pool fights other jobs for the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family, seed=1)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family) -> torch.nn.Module:
    return _model(family)


INPUT = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def plain_points(model, family: str, keys) -> dict[tuple[int, str], list[torch.Tensor]]:
    """One forward with hooks registered directly on the literal module paths of each (layer, component)."""
    prefix = LAYERS_PREFIX.get(family, "model.layers")
    seen, handles = {key: [] for key in keys}, []
    for layer, component in keys:
        for path, side, half in POINTS[family][component]:

            def hook(module, args, out, side=side, half=half, into=seen[layer, component]):
                value = (args[0] if side == "in" else out).reshape(BATCH, SEQ, -1)
                into.append(value if half is None else value.chunk(2, dim=-1)[half])

            handles.append(model.get_submodule(f"{prefix}.{layer}.{path}").register_forward_hook(hook))
    logits(model)
    for handle in handles:
        handle.remove()
    return seen


def consumer_inputs(model, family: str, layer: int, component: str) -> list[torch.Tensor]:
    return plain_points(model, family, [(layer, component)])[layer, component]


def captured(model, components, layers=None) -> dict[tuple[int, str], torch.Tensor]:
    values = {}
    with capture(model, components, lambda layer, c, v: values.__setitem__((layer, c), v), layers):
        logits(model)
    return values


def masked(v: torch.Tensor, t) -> torch.Tensor:
    return torch.where(v.abs() < torch.as_tensor(t), torch.zeros_like(v), v)


def median_abs(v: torch.Tensor) -> float:
    return v.abs().flatten().median().item()


# --- capture ---------------------------------------------------------------------------------


def test_capture_matches_plain_hooks_bit_for_bit(model, family):
    components = anatomy_of(model).components
    assert set(components) == set(POINTS[family])
    values = captured(model, components)
    assert set(values) == {(layer, c) for layer in range(3) for c in components}
    references = plain_points(model, family, values)
    for (layer, component), value in values.items():
        assert value.shape == (BATCH, SEQ, CHANNELS[component]), (layer, component)
        assert not value.requires_grad
        assert len(references[layer, component]) == len(POINTS[family][component])
        for reference in references[layer, component]:
            assert torch.equal(value, reference), (layer, component)


@pytest.mark.parametrize("family", GATED)
def test_captured_h_is_act_times_up(family):
    values = captured(_model(family), ["act", "up", "h"])
    for layer in range(3):
        assert torch.equal(values[layer, "h"], values[layer, "act"] * values[layer, "up"])


@pytest.mark.parametrize("family", ["phi", "opt"])
def test_captured_h_is_act_without_gate(family):
    values = captured(_model(family), ["act", "h"], layers=[1])
    assert set(values) == {(1, "act"), (1, "h")}
    assert torch.equal(values[1, "h"], values[1, "act"])


def test_capture_rejects_bad_input():
    model = _model("opt")
    with pytest.raises(ValueError, match="no component"):
        capture(model, ["up"], print)
    with pytest.raises(ValueError, match="out of range"):
        capture(model, ["act"], print, layers=[3])


# --- masking: identity and removal -----------------------------------------------------------


def test_zero_thresholds_are_bit_identical_and_removal_restores(model):
    dense = logits(model)
    weights = copy.deepcopy(model.state_dict())
    components = anatomy_of(model).components
    zero = {(layer, c): 0.0 for layer in range(3) for c in components}
    with apply_thresholds(model, zero, token_mask=last_fraction(0.5)):
        assert torch.equal(logits(model), dense)
    values = captured(model, components)
    medians = {key: median_abs(v) for key, v in values.items()}
    hooks = apply_thresholds(model, medians)
    assert not torch.allclose(logits(model), dense)
    hooks.remove()
    assert torch.equal(logits(model), dense)
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)


# --- masking: values, counts, manual references ----------------------------------------------


def test_median_act_threshold_gives_half_zeros_counted_exactly(model):
    dense_act = captured(model, ["act"])
    thresholds = {(layer, "act"): median_abs(v) for (layer, _), v in dense_act.items()}
    counter = ZeroCounter()
    with apply_thresholds(model, thresholds, counter=counter):
        after = captured(model, ["act"])
    sparsity = counter.sparsity()
    assert set(sparsity) == set(thresholds)
    for layer in range(3):
        direct = (after[layer, "act"] == 0).sum().item()
        assert counter.counts()[layer, "act"] == (direct, BATCH * SEQ * FFN)
    # layer 0's act sees dense input: its zeros are exactly the dense values below the median
    assert torch.equal(after[0, "act"], masked(dense_act[0, "act"], thresholds[0, "act"]))
    assert sparsity[0, "act"] == pytest.approx(0.5, abs=0.02)


def manual_llama_mlp(mlp, x: torch.Tensor, t: float) -> torch.Tensor:
    a = masked(F.silu(F.linear(x, mlp.gate_proj.weight)), t)
    return F.linear(a * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)


def manual_phi3_mlp(mlp, x: torch.Tensor, t: float) -> torch.Tensor:
    gate, up = F.linear(x, mlp.gate_up_proj.weight).chunk(2, dim=-1)
    return F.linear(masked(F.silu(gate), t) * up, mlp.down_proj.weight)


def manual_opt_mlp(layer, x: torch.Tensor, t: float) -> torch.Tensor:
    a = masked(F.relu(F.linear(x, layer.fc1.weight, layer.fc1.bias)), t)
    return F.linear(a, layer.fc2.weight, layer.fc2.bias)


@pytest.mark.parametrize(
    "family, mlp_path, manual",
    [("llama", "mlp", manual_llama_mlp), ("qwen2", "mlp", manual_llama_mlp), ("phi3", "mlp", manual_phi3_mlp),
     ("opt", "", manual_opt_mlp)],
)
def test_masked_mlp_equals_manual_forward(family, mlp_path, manual):
    model = _model(family)
    dense = captured(model, ["ffn_in", "act", "down"], layers=[0])
    t = dense[0, "act"].abs().flatten().quantile(0.75).item()  # above OPT's many exact ReLU zeros
    with apply_thresholds(model, {(0, "act"): t}):
        out = captured(model, ["down"], layers=[0])[0, "down"]
    expected = manual(decoder_layers(model)[0].get_submodule(mlp_path), dense[0, "ffn_in"], t)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, dense[0, "down"])


@pytest.mark.parametrize("masked_half", ["gate", "up"])
def test_phi3_masks_only_the_matching_half_of_gate_up(masked_half):
    model = _model("phi3")
    dense = captured(model, ["gate", "up"], layers=[0])
    t = median_abs(dense[0, masked_half])
    counter = ZeroCounter()
    with apply_thresholds(model, {(0, masked_half): t}, counter=counter):
        after = captured(model, ["gate", "up"], layers=[0])
    other = "up" if masked_half == "gate" else "gate"
    assert torch.equal(after[0, other], dense[0, other])
    assert torch.equal(after[0, masked_half], masked(dense[0, masked_half], t))
    assert set(counter.sparsity()) == {(0, masked_half)}
    assert counter.counts()[0, masked_half][0] == (after[0, masked_half] == 0).sum().item()


def test_phi3_gate_and_up_thresholds_share_the_fused_output():
    model = _model("phi3")
    dense = captured(model, ["gate", "up"], layers=[1])
    t = {(1, c): median_abs(dense[1, c]) for c in ("gate", "up")}
    with apply_thresholds(model, t):
        after = captured(model, ["gate", "up"], layers=[1])
    for c in ("gate", "up"):
        assert torch.equal(after[1, c], masked(dense[1, c], t[1, c]))


def test_per_channel_thresholds_apply_per_channel(model):
    dense = captured(model, ["act"], layers=[0])[0, "act"]
    ranks = torch.linspace(2, BATCH * SEQ - 3, FFN).long()  # low ranks for the first channels
    per_channel = dense.abs().flatten(0, 1).sort(dim=0).values.gather(0, ranks[None])[0]
    with apply_thresholds(model, {(0, "act"): per_channel}):
        after = captured(model, ["act"], layers=[0])[0, "act"]
    assert torch.equal(after, masked(dense, per_channel))
    zero_share = (after == 0).float().mean(dim=(0, 1))
    assert zero_share[: FFN // 4].mean() < zero_share[-FFN // 4 :].mean()


@pytest.mark.parametrize("component", ["ffn_in", "attn_in", "o_in", "h"])
def test_input_masking_reaches_every_consumer(model, family, component):
    dense = consumer_inputs(model, family, 1, component)[0]
    t = median_abs(dense)
    counter = ZeroCounter()
    with apply_thresholds(model, {(1, component): t}, counter=counter):
        consumers = consumer_inputs(model, family, 1, component)
    for seen in consumers:
        assert torch.equal(seen, masked(dense, t))
    zeros = (masked(dense, t) == 0).sum().item()
    assert counter.counts() == {(1, component): (zeros, dense.numel())}  # counted once, not per consumer


def test_kv_dense_masks_only_the_query_input():
    model = _model("llama")
    dense = consumer_inputs(model, "llama", 0, "attn_in")[0]
    t = median_abs(dense)
    with apply_thresholds(model, {(0, "attn_in"): t}, kv_dense=True):
        q, k, v = consumer_inputs(model, "llama", 0, "attn_in")
    assert torch.equal(q, masked(dense, t))
    assert torch.equal(k, dense) and torch.equal(v, dense)
    with pytest.raises(ValueError, match="share"):
        apply_thresholds(_model("phi3"), {(0, "attn_in"): t}, kv_dense=True)


# --- token selection -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "opt"])  # opt: its FFN is flattened to [b*s, c]
def test_last_fraction_sparsifies_only_the_last_positions(family):
    model = _model(family)
    dense = captured(model, ["act"], layers=[0])[0, "act"]
    t = median_abs(dense)
    counter = ZeroCounter()
    with apply_thresholds(model, {(0, "act"): t}, token_mask=last_fraction(0.5), counter=counter):
        after = captured(model, ["act"], layers=[0])[0, "act"]
    half = SEQ // 2
    assert torch.equal(after[:, :half], dense[:, :half])
    assert torch.equal(after[:, half:], masked(dense[:, half:], t))
    assert counter.counts()[0, "act"] == ((after[:, half:] == 0).sum().item(), BATCH * half * FFN)


def test_last_fraction_rounds_up():
    assert last_fraction(0.5)(5).tolist() == [False, False, True, True, True]
    assert last_fraction(0.3)(10).sum() == 3
    assert last_fraction(0.5)(1).tolist() == [True]
    with pytest.raises(ValueError):
        last_fraction(0)


def test_bad_token_mask_is_reported():
    with apply_thresholds(_model("llama"), {(0, "act"): 0.1}, token_mask=lambda n: torch.ones(n)):
        with pytest.raises(ValueError, match="bool tensor"):
            logits(_model("llama"))


# --- counting natural sparsity and validation ------------------------------------------------


def test_zero_counter_as_capture_sink_counts_natural_zeros():
    model = _model("opt")  # ReLU: many exact zeros
    values = captured(model, ["act", "gate"])
    counter = ZeroCounter()
    with capture(model, ["act", "gate"], counter):
        logits(model)
        logits(model)
    for (layer, c), v in values.items():
        assert counter.counts()[layer, c] == (2 * (v == 0).sum().item(), 2 * v.numel())
    assert all(counter.sparsity()[layer, "act"] > 0.2 for layer in range(3))
    assert all(counter.sparsity()[layer, "gate"] == 0 for layer in range(3))


@pytest.mark.parametrize(
    "thresholds, message",
    [
        ({(0, "up"): 0.1}, "no component"),
        ({(5, "act"): 0.1}, "out of range"),
        ({(0, "act"): torch.zeros(FFN + 1)}, "vector of 128"),
        ({(0, "down"): torch.zeros(FFN)}, "vector of 64"),
        ({(0, "act"): -1.0}, ">= 0"),
    ],
)
def test_bad_thresholds_are_rejected(thresholds, message):
    with pytest.raises(ValueError, match=message):
        apply_thresholds(_model("opt"), thresholds)


def test_thresholds_follow_the_model_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    dense = captured(model, ["h"], layers=[2])[2, "h"]
    t = torch.tensor(median_abs(dense), dtype=torch.float64)
    with apply_thresholds(model, {(2, "h"): t}):
        after = consumer_inputs(model, "llama", 2, "h")[0]
    assert after.dtype == torch.bfloat16
    assert torch.equal(after, masked(dense, t.to(torch.bfloat16)))
    assert decoder_layers(model)[2].mlp.down_proj.weight.dtype == torch.bfloat16
