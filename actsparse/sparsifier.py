"""Apply a fitted thresholds file to a loaded model, and measure what it achieved.

A thresholds file describes itself: its tensor names say which (layer, component) to mask and
its metadata says whether attention k/v stay dense, so one loaded model can serve any method
and any number of grid points (attach, evaluate, remove).

Skippable FFN work. A zero in a projection's input lets that projection skip the matching weight
column; a zero in ``act`` of a gated FFN also lets up_proj skip the matching row (its output is
multiplied by zero). Per projection the skipped fraction is the largest of the sparsities that
apply to it (a lower bound on the union), weighted by parameter count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from actsparse import hooks
from actsparse.anatomy import anatomy_of, decoder_layers

# components whose zeros skip FFN work, observed on every layer during evaluation
_OBSERVED = ("ffn_in", "act", "h")


@dataclass
class Measured:
    """Zero counts gathered while a sparsified model runs."""

    masked: hooks.ZeroCounter  # the thresholded components, on the sparsified positions
    observed: hooks.ZeroCounter  # ffn_in, act and h after masking, every position


@contextmanager
def sparsified(
    model: nn.Module, thresholds: dict, kv_dense: bool = False, token_mask: hooks.TokenMask | None = None
) -> Iterator[Measured]:
    """Mask ``model`` with ``thresholds`` inside the block; on exit the model is dense again."""
    measured = Measured(hooks.ZeroCounter(), hooks.ZeroCounter())
    with hooks.apply_thresholds(model, thresholds, token_mask, measured.masked, kv_dense):
        with hooks.capture(model, _OBSERVED, measured.observed):
            yield measured


def _per_layer(counter: hooks.ZeroCounter, component: str) -> dict[int, float]:
    return {layer: zeros / seen for (layer, comp), (zeros, seen) in counter.counts().items() if comp == component}


def achieved_sparsity(measured: Measured) -> float:
    """Fraction of zeros over every element of every thresholded component."""
    counts = measured.masked.counts().values()
    seen = sum(n for _, n in counts)
    return sum(z for z, _ in counts) / seen if seen else 0.0


def skipped_ffn_fraction(model: nn.Module, measured: Measured) -> float:
    """Fraction of FFN weight work that the observed zeros make skippable (see module docstring)."""
    anatomy = anatomy_of(model)
    sparsity = {c: _per_layer(measured.observed, c) for c in _OBSERVED}
    skipped = total = 0.0
    for index, layer in enumerate(decoder_layers(model, anatomy)):
        ffn_in, act, h = (sparsity[c].get(index, 0.0) for c in _OBSERVED)
        down = layer.get_submodule(anatomy.down).weight.numel()
        skipped += down * h
        total += down
        if anatomy.gate_up:
            fused = layer.get_submodule(anatomy.gate_up).weight.numel()
            skipped += fused / 2 * ffn_in + fused / 2 * max(ffn_in, act)
            total += fused
            continue
        up = layer.get_submodule(anatomy.up).weight.numel()
        skipped += up * (max(ffn_in, act) if anatomy.gated else ffn_in)
        total += up
        if anatomy.gate:
            gate = layer.get_submodule(anatomy.gate).weight.numel()
            skipped += gate * ffn_in
            total += gate
    return skipped / total


def layer_sparsity(measured: Measured) -> dict[str, float]:
    """Achieved sparsity per thresholded (layer, component), keyed ``layers.{i}.{component}``."""
    return {f"layers.{i}.{c}": s for (i, c), s in sorted(measured.masked.sparsity().items())}
