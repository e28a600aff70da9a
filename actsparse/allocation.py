"""Greedy sparsity allocation (TEAL, ``teal/greedyopt.py``): per decoder layer, a sparsity for each
masked component instead of one uniform level, found on calibration tokens.

Per layer (block) the search starts dense and repeatedly raises the sparsity of one masked
component by ``STEP``: the one whose raise costs the least added block output error per added
parameter-weighted sparsity. A component's weight is the parameters of the projections its
zeros concern (``component_parameters``: ffn_in gate and up, h down, attn_in q, k and v, o_in o,
act up and down), so the block's average ``f = sum_c w_c s_c / sum_c w_c`` is TEAL's effective
sparsity. Every step is one point of the layer's path; the allocation of target level ``L`` is
the path up to the step that crosses ``L``, that step taken only as far as ``L`` needs (to the
next 0.01 of the raised component, the fit's grid). Thresholds are the method's own fit (its grid file) at each
component's level, so one search serves every method level and every target.

Block output error: the decoder layer run alone on its dense input (captured from one dense
forward of the calibration tokens), ``mean over positions of ||y - y_dense||_2``.

Where this differs from TEAL's greedyopt.py:

* TEAL's step sizes are ``base_step / weight`` (0.025 / weight) so every step adds the same,
  small ``f``; here every step is ``STEP`` (0.1, for the CPU budget) on a component's own
  sparsity (a level of its 0.01 grid), so steps add different ``f`` and are ranked by added
  error per added ``f`` (TEAL ranks by error, the same
  thing when the added ``f`` is equal).
* TEAL scores error as the norm over positions of the last 25% of each sequence, averaged over
  hidden units; here the per-token L2 norm over hidden units, averaged over every position (the
  evaluation sparsifies every position by default).
* TEAL searches on 20 samples on a GPU; here ``SEARCH_TOKENS`` calibration tokens (CPU budget).
* Our components are the projections' inputs, so gate and up (and q, k and v) share one
  sparsity, as they share one mask (TEAL's greedy sets them apart).
* A guard TEAL lacks: where the uniform allocation at ``L`` has no more block error than the
  greedy point, the uniform one is kept, so no block's calibration error exceeds uniform's;
  levels past the path's end (``f`` above ``STEP``'s last multiple) are uniform too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from actsparse.anatomy import Anatomy, anatomy_of, decoder_layers
from actsparse.hooks import hook_sites, apply_thresholds
from actsparse.stats import Key

log = logging.getLogger(__name__)

# A layer's search runs about (4 / STEP) * components + 200 blocks on SEARCH_TOKENS tokens: with
# these, ~3 CPU minutes for SmolLM2-135M's 30 layers (one thread); finer steps or more tokens
# cost proportionally more.
STEP = 0.1  # raise of one component's sparsity per greedy step
SEARCH_TOKENS = 128  # calibration tokens (BOS included) the block errors are measured on
_TIE = 1e-12  # error differences below this count as equal (float summation order)


def component_parameters(layer: nn.Module, anatomy: Anatomy, component: str, kv_dense: bool = False) -> int:
    """Parameters of the projections whose work a zero of ``component`` concerns (TEAL's weights)."""
    if component == "act":  # a zero channel skips its up_proj row and down_proj column
        return sum(component_parameters(layer, anatomy, c) for c in ("up", "down"))
    total = 0
    for site in hook_sites(anatomy, component, kv_dense):
        numel = layer.get_submodule(site.path).weight.numel()
        total += numel // 2 if site.half is not None else numel
    return total


@dataclass(frozen=True)
class Block:
    """One decoder layer's dense calibration input and output, to run it alone."""

    layer: nn.Module
    args: tuple
    kwargs: dict
    target: torch.Tensor

    def output(self) -> torch.Tensor:
        out = self.layer(*self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def error(self) -> float:
        return float(torch.linalg.vector_norm(self.output() - self.target, dim=-1).mean())


@torch.no_grad()
def blocks(model: nn.Module, ids: torch.Tensor) -> list[Block]:
    """Every decoder layer's inputs (as the model calls it) and dense output on ``ids`` [1, seq]."""
    layers = decoder_layers(model, anatomy_of(model))
    calls: dict[int, tuple[tuple, dict]] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: calls.setdefault(i, (a, dict(k))), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    try:
        model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    found = [Block(layer, *calls[i], target=torch.empty(0)) for i, layer in enumerate(layers)]
    return [Block(b.layer, b.args, b.kwargs, b.output()) for b in found]


def _grid_index(level: float) -> int:
    return int(round(level * 100))


class _LayerSearch:
    """The greedy path of one layer over the method's threshold grid."""

    def __init__(self, model: nn.Module, index: int, block: Block, grid: Mapping[Key, torch.Tensor],
                 weights: Mapping[str, float], kv_dense: bool) -> None:
        self.model, self.index, self.block, self.grid = model, index, block, grid
        self.weights = dict(weights)
        self.kv_dense = kv_dense
        self.total = sum(self.weights.values())

    @torch.no_grad()
    def error(self, levels: Mapping[str, float]) -> float:
        thresholds = {(self.index, c): self.grid[self.index, c][_grid_index(s)] for c, s in levels.items() if s > 0}
        with apply_thresholds(self.model, thresholds, kv_dense=self.kv_dense):
            return self.block.error()

    def average(self, levels: Mapping[str, float]) -> float:
        return sum(self.weights[c] * s for c, s in levels.items()) / self.total

    def at(self, points: list[tuple[float, dict[str, float], float]], level: float) -> dict[str, float] | None:
        """The path's allocation at ``level``: the step that crosses it, taken only as far as the
        level needs (to the next 0.01 of the raised component); None past the path's end."""
        crossing = next((k for k, point in enumerate(points) if point[0] >= level - 1e-9), None)
        if crossing is None or crossing == 0:
            return None if crossing is None else points[0][1]
        (f, before, _), after = points[crossing - 1], points[crossing][1]
        (raised,) = [c for c in before if before[c] != after[c]]
        need = (level - f) * self.total / self.weights[raised]
        return before | {raised: min(after[raised], round(before[raised] + math.ceil(need * 100 - 1e-9) / 100, 2))}

    def path(self, top: float) -> list[tuple[float, dict[str, float], float]]:
        """(average f, component levels, block error) after each step, dense first."""
        levels = {c: 0.0 for c in self.weights}
        error = self.error(levels)
        points = [(0.0, dict(levels), error)]
        while True:
            best = None
            for c in self.weights:  # a fixed order, so ties resolve the same way every run
                if round(levels[c] + STEP, 2) > top:
                    continue
                trial = levels | {c: round(levels[c] + STEP, 2)}
                trial_error = self.error(trial)
                cost = (trial_error - error) / (STEP * self.weights[c] / self.total)
                if best is None or cost < best[0] - _TIE:
                    best = (cost, trial, trial_error)
            if best is None:
                return points
            _, levels, error = best
            points.append((self.average(levels), dict(levels), error))


def allocate(
    model: nn.Module,
    ids: torch.Tensor,
    grid: Mapping[Key, torch.Tensor],
    grid_levels: Sequence[float],
    kv_dense: bool = False,
) -> dict[Key, np.ndarray]:
    """Per (layer, component) of ``grid`` the sparsity to use at each of ``grid_levels`` (the
    grid's own levels, 0.01 apart from 0): the first greedy point reaching the level, or the
    uniform allocation where that has no more block error (see the module doc)."""
    levels = np.asarray(grid_levels, dtype=np.float64)
    if not np.allclose(levels, np.arange(len(levels)) / 100):
        raise ValueError("the greedy search needs the full threshold grid (levels 0.00, 0.01, ...)")
    anatomy = anatomy_of(model)
    layers = decoder_layers(model, anatomy)
    found = blocks(model, ids)
    allocation: dict[Key, np.ndarray] = {}
    for index in sorted({layer for layer, _ in grid}):
        components = [c for layer, c in grid if layer == index]
        weights = {c: component_parameters(layers[index], anatomy, c, kv_dense) for c in components}
        search = _LayerSearch(model, index, found[index], grid, weights, kv_dense)
        points = search.path(top=float(levels[-1]))
        chosen = {c: np.array(levels) for c in components}  # uniform unless greedy is better
        for i, level in enumerate(levels):
            greedy = search.at(points, float(level))
            uniform = {c: float(level) for c in components}
            if level == 0 or greedy is None or greedy == uniform:
                continue
            if search.error(greedy) < search.error(uniform) - _TIE:
                for c in components:
                    chosen[c][i] = greedy[c]
        allocation |= {(index, c): chosen[c] for c in components}
        greedy = int(sum(chosen[c] != levels for c in components).astype(bool).sum())
        log.info("layer %d: %d greedy steps, greedy allocation at %d of %d levels", index, len(points) - 1, greedy,
                 len(levels))
    return allocation
