"""bench/bench_c_step.py's C decoder layer against PyTorch on tiny models: its speed numbers
(bench/RESULTS.md) mean something only while its check holds, and the check must fail when the
C steps compute something else."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from actsparse.anatomy import decoder_layers
from actsparse.hooks import capture
from actsparse.models import tiny_model
from conftest import bench_module

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
def test_c_steps_equal_pytorch_dense_and_masked(family, method, capsys):
    """CHESS+ keeps k and v dense (kv_dense): its attn_in threshold feeds q alone."""
    bench = bench_module("bench_c_step")
    thresholds = _medians(family, method)
    decoder = bench.CDecoder(_model(family), thresholds, len(PROMPT) + 4, kv_dense=method == "chess+")
    bench.check(_model(family), decoder, thresholds, PROMPT)
    printed = capsys.readouterr().out
    assert printed.count("argmax equal") == 2
    active: list[dict] = []  # per layer, per thresholded site: the channels the first token kept
    decoder.step(int(PROMPT[0]), 0, bench.SPARSE, active)
    kept = sum(len(channels) for layer in active for channels in layer.values())
    channels = sum(v.shape[-1] for v in _values(family, method).values())
    assert len(active) == len(decoder_layers(_model(family))) and 0.1 < kept / channels < 0.9
    seconds = bench.time_c_steps(decoder, PROMPT[:4], 4, 1)
    assert set(seconds) == {bench.DENSE, bench.EVERY, bench.SPARSE} and min(seconds.values()) > 0


def test_the_check_fails_when_the_c_steps_threshold_otherwise():
    """The C steps thresholded at the 30th percentile, PyTorch's reference at the median: the
    masks then differ far from any threshold, which rounding cannot explain."""
    bench = bench_module("bench_c_step")
    medians = _medians("qwen2", "teal")
    lower = {key: 0.6 * t for key, t in medians.items()}
    decoder = bench.CDecoder(_model("qwen2"), lower, len(PROMPT))
    with pytest.raises(AssertionError, match="more than rounding"):
        bench.check(_model("qwen2"), decoder, medians, PROMPT)


@pytest.mark.parametrize("extra, message", [("ffn_in", "act and an FFN input"), ("gate", "'gate'")])
def test_thresholds_the_layer_cannot_take_are_refused_by_name(extra, message):
    """act and an FFN input both, or a component no kernel reads: refused as the library's sparse
    decoding, whose layouts the C layer reads, refuses them."""
    bench = bench_module("bench_c_step")
    thresholds = _medians("llama", "cats") | {(0, extra): 0.1}
    with pytest.raises(ValueError, match=message):
        bench.CDecoder(_model("llama"), thresholds, 8)
