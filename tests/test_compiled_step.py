"""The compiled decoding step (actsparse.compiled_step) against PyTorch on tiny models: its speed
columns mean something only while its check holds, and the check must fail when the C steps
compute something else."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from actsparse import compiled_step
from actsparse.anatomy import decoder_layers
from actsparse.compiled_step import DENSE, EVERY, SPARSE, CompiledDecoder, check
from actsparse.hooks import capture
from actsparse.models import tiny_model

PROMPT = torch.tensor([256, *b"The cat sat on the mat."])
COMPONENTS = {"cats": ("act",), "chess": ("act",), "chess+": ("act", "attn_in", "o_in"),
              "teal": ("attn_in", "o_in", "ffn_in", "h")}


@cache
def _model(family: str) -> torch.nn.Module:
    return tiny_model(family, seed=1)


@cache
def _values(family: str, method: str) -> dict:
    """Per (layer, component) the values over the prompt, [tokens, channels]."""
    values: dict = {}
    with capture(_model(family), COMPONENTS[method], lambda layer, c, v: values.__setitem__((layer, c), v[0])):
        _model(family)(PROMPT[None])
    return values


def _medians(family: str, method: str) -> dict:
    """Per (layer, component) the median |value| over the prompt: thresholds zeroing half; CHESS's
    one per channel."""
    if method == "chess":
        return {key: v.abs().median(dim=0).values for key, v in _values(family, method).items()}
    return {key: float(np.median(v.abs().flatten().numpy())) for key, v in _values(family, method).items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["cats", "chess", "chess+", "teal"])
def test_c_steps_equal_pytorch_dense_and_masked(family, method):
    """CHESS+ keeps k and v dense (kv_dense): its attn_in threshold feeds q alone."""
    thresholds = _medians(family, method)
    decoder = CompiledDecoder(_model(family), thresholds, len(PROMPT) + 4, kv_dense=method == "chess+")
    checked = check(_model(family), decoder, thresholds, PROMPT)
    assert checked.dense_logit_diff < 1e-5 and checked.masked_logit_diff < 1e-5
    assert checked.values_checked > 0 and checked.nearest_flip <= compiled_step.FLIP_DISTANCE
    active: list[dict] = []  # per layer, per thresholded site: the channels the first token kept
    decoder.step(int(PROMPT[0]), 0, SPARSE, active)
    kept = sum(len(channels) for layer in active for channels in layer.values())
    channels = sum(v.shape[-1] for v in _values(family, method).values())
    assert len(active) == len(decoder_layers(_model(family))) and 0.1 < kept / channels < 0.9
    seconds = compiled_step.time_steps(decoder, PROMPT[:4], 4, 1)
    assert set(seconds) == {DENSE, EVERY, SPARSE} and min(seconds.values()) > 0


def test_the_check_fails_when_the_c_steps_threshold_otherwise():
    """The C steps thresholded at the 30th percentile, PyTorch's reference at the median: the
    masks then differ far from any threshold, which rounding cannot explain."""
    medians = _medians("qwen2", "teal")
    lower = {key: 0.6 * t for key, t in medians.items()}
    decoder = CompiledDecoder(_model("qwen2"), lower, len(PROMPT))
    with pytest.raises(AssertionError, match="more than rounding"):
        check(_model("qwen2"), decoder, medians, PROMPT)


@pytest.mark.parametrize("extra, message", [("ffn_in", "act and an FFN input"), ("gate", "'gate'")])
def test_thresholds_the_layer_cannot_take_are_refused_by_name(extra, message):
    """act and an FFN input both, or a component no kernel reads: refused as the library's sparse
    decoding, whose layouts the C layer reads, refuses them."""
    thresholds = _medians("llama", "cats") | {(0, extra): 0.1}
    with pytest.raises(ValueError, match=message):
        CompiledDecoder(_model("llama"), thresholds, 8)


def test_models_the_layer_does_not_implement_are_refused_and_get_no_speed():
    """A family without a compiled layer, a Llama whose FFN is not SiLU-gated, a Qwen2 attending
    through a sliding window: refused by name, and ``compiled_speed`` records NaN for it instead
    of a speed."""
    gelu, windowed = tiny_model("llama", seed=1), tiny_model("qwen2", seed=1)
    gelu.config.hidden_act = "gelu"
    windowed.config.use_sliding_window = True
    for model, reason in ((tiny_model("gemma", seed=1), "gemma family"), (gelu, "hidden_act 'gelu'"),
                          (windowed, "sliding attention window")):
        assert reason in compiled_step.unsupported(model)
        with pytest.raises(ValueError, match=reason):
            CompiledDecoder(model, {}, 8)
        speed = compiled_step.compiled_speed(model, {}, PROMPT, 4, 1)
        assert all(np.isnan(value) for value in speed.values())


def test_compiled_speed_reports_the_sparse_step_over_the_faster_dense_one():
    speed = compiled_step.compiled_speed(_model("llama"), _medians("llama", "cats"), PROMPT, 6, 1)
    assert speed["compiled_speedup"] == pytest.approx(speed["compiled_sparse_tps"] / speed["compiled_dense_tps"])
    assert speed["compiled_dense_tps"] > 0 and speed["compiled_logit_diff"] < 1e-5
    weights = sum(m.weight.numel() * 4 for m in _model("llama").modules() if isinstance(m, torch.nn.Linear))
    assert speed["compiled_dense_gbps"] == pytest.approx(speed["compiled_dense_tps"] * weights / 1e9)


def test_a_position_beyond_the_cache_is_refused():
    decoder = CompiledDecoder(_model("llama"), _medians("llama", "cats"), 4)
    with pytest.raises(IndexError, match="KV cache of 4"):
        decoder.step(1, 4, DENSE)


def test_repeats_decode_on_from_one_prompt_pass():
    """``time_steps`` runs the prompt once and every repeat decodes on from its cache: afterwards
    the step right after the prompt still equals PyTorch's forward over the prompt and that token."""
    model, prompt = _model("qwen2"), PROMPT[:8]
    decoder = CompiledDecoder(model, _medians("qwen2", "teal"), len(prompt) + 6)
    compiled_step.time_steps(decoder, prompt, 6, 2)
    logits = decoder.step(7, len(prompt), DENSE)
    with torch.inference_mode():
        expected = model(torch.cat([prompt, torch.tensor([7])])[None]).logits[0, -1]
    assert float((logits - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
