"""Threshold fitting for the sparsification methods, from calibration activations.

A method turns calibration data (the complete shard stores of one collection and their merged
statistics) into one threshold per (layer, component) for every requested sparsity ``s``: a
scalar, or a per-channel vector for channel-wise methods. The sparsifier zeroes ``v`` where
``|v| < t``. ``P_s(x)`` below is ``numpy.percentile(x, 100 * s)`` (method "linear") over the
float32 values converted from the stored float16/bfloat16 values, reproduced exactly.

* ``layer`` (Dhar et al.): ``t = P_s(|v|)`` per layer and component; components from
  ``params["components"]``, default gate, up and h.
* ``cats``: ``t = P_s(|act|)`` per layer.
* ``chess``: channel-wise on ``act``. ``m_c = mean |up_c|`` over all calibration tokens (merged
  statistics of every shard), importance ``|a| * m_c`` in float32, per-layer ``T = P_s(importance)``,
  ``t_c = T / m_c``. A channel with ``m_c = 0`` gets ``t_c = inf`` when ``T > 0`` and 0 when
  ``T = 0``: exactly "zero ``a`` where ``|a| * m_c < T``", so such a channel (whose ``h = a * u``
  was 0 on every calibration token) is dropped whenever anything is, and the calibration sparsity
  still meets the target.
* ``chess+``: chess, plus ``t = P_s(|attn_in|)`` and ``t = P_s(|o_in|)`` per layer; its masking
  keeps k and v dense (``kv_dense``), which a fused qkv projection (Phi-3) cannot do.
* ``teal``: ``t = P_s(|v|)`` on ffn_in, h, attn_in and o_in, the inputs of all seven projections,
  one uniform sparsity.
* ``wina``: TEAL's components scored by ``|x_c| * n_c``, ``n_c`` the L2 norm of column ``c`` of the
  weights that consume the input (``hooks.input_column_norms``: for an input feeding several
  projections, gate and up or q, k and v, the norm over all of them stacked, which is the column
  norm of a fused gate_up or qkv weight). ``T = P_s(|x| * n)`` per layer and component (float32
  products, as chess), ``t_c = T / n_c``; ``n_c = 0`` is handled as ``m_c = 0`` in chess. Where
  WINA's code differs: it masks gate and up (and q, k, v) separately, scoring gate's input with
  gate_proj's column norms and up's and down's with unit norms (its models are first transformed
  to make those columns orthogonal); here one mask per input serves all its consumers, so the
  decode kernels skip the same columns of each.

The registry (``actsparse.registry``) declares each method; ``FITS`` holds the fit of each of its
scores. Every method fits one sparsity for all its keys; ``allocation: greedy`` then picks each
key's level of the same grid per target (``actsparse.allocation``, ``load_allocated``).

Non-gated FFNs (OPT, Phi-2; fit with ``gated=False``) have no ``up``: ``layer``'s default drops it
(gate is then the fc1 output, h the fc2 input), ``cats`` is unchanged (``act`` feeds fc2), and
``chess`` uses ``m_c = 1``: every channel gets cats' threshold, as a vector. Naming ``up``
explicitly for a non-gated model is an error.

Sparsity 0 gives ``t = 0`` everywhere: ``P_0`` is the calibration minimum, which would still zero
smaller evaluation values.

Quantile modes (chess and chess+): ``exact`` takes one quantile over all calibration tokens;
``per_sample`` follows the CHESS reference code: a quantile per calibration sample, the
consecutive blocks of ``seq_len`` tokens of each shard (a shard's last block may be shorter),
averaged with equal weight. ``quantile_mode_difference`` compares the two.

Streaming: exact quantiles come from ``QuantileSketch`` in two passes over the calibration
values, all sparsity levels answered by the same two passes. The values come from a
``sources.BlockSource``: the shard stores, each needed array read once a pass, or live forward
passes over the calibration shards (storeless), which give the same values bit for bit. Pass 2
needs 128 KiB per distinct 16-bit bucket holding a needed rank, about one per level and key
(1.1 MiB a key for 9 levels, 13 MiB for the 100-level ``GRID``), so it runs once per group of
keys whose counts fit the source's budget (``_PASS2_BYTES`` for stores: several groups for the
grid, with no array read twice; 4 GiB for forwards). A magnitude stream whose exact
distribution the source already counted (16-bit values, storeless) needs no pass at all
(``quantiles.histogram_quantiles``), and an importance stream of 16-bit values needs one
(per-channel magnitude counts, ``quantiles.ChannelMagnitudeCounts``, 32 KiB a channel) where
the counts of all such keys fit the budget at once. Memory does not grow with the calibration
tokens: 512 KiB per key for pass 1, one group's pass-2 counts (or the per-channel counts), and
one read block (one batch, for forwards).

Threshold files: safetensors, one float64 tensor ``layers.{i}.{component}`` per key (0-d or a
per-channel vector; float64 is numpy.percentile's result, kept unrounded) and, in the header,
every metadata entry JSON-encoded beside ``format`` and the ``checksum`` that loading verifies
(``provenance.verify_safetensors``). Grid files (``save_grid``) hold every level
of one fit the same way, each tensor with the levels stacked on a leading dimension, and the
levels in the header entry ``sparsities``.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from actsparse.anatomy import COMPONENTS
from actsparse.registry import (  # noqa: F401 (re-exported: the registry is part of this API)
    METHODS,
    QUANTILE_MODES,
    Options,
    Requirements,
    method_named,
    options,
    requirements,
)
from actsparse.provenance import CHECKSUM, damage_report, verify_safetensors, write_safetensors
from actsparse.quantiles import ChannelMagnitudeCounts, QuantileSketch, histogram_quantiles
from actsparse.sources import BlockSource, StoreSource
from actsparse.stats import Key, check_key

Thresholds = dict[Key, torch.Tensor]
Transform = Callable[[torch.Tensor], torch.Tensor]  # stored chunk -> float32 values to rank

THRESHOLDS_FORMAT = "actsparse.thresholds/1"
GRID_FORMAT = "actsparse.threshold-grid/1"
ALLOCATION_FORMAT = "actsparse.allocation/1"
# Every sparsity a two-decimal label can name: fitting them all at once means adding a level to
# an experiment never refits.
GRID = tuple(round(k / 100, 2) for k in range(100))
QUANTILE_DEFINITION = (
    "numpy.percentile(values, 100 * s), method 'linear' (Hyndman-Fan type 7), on float32 values "
    "converted from the stored dtype"
)
_PASS2_BYTES = 1 << 29  # pass-2 counts held at once; past it, pass 2 sweeps the keys in groups
_NAME = re.compile(r"layers\.(\d+)\.(\w+)")


class MissingComponentError(ValueError):
    """The calibration stores lack a component the method needs."""


class ThresholdFileError(ValueError):
    """A thresholds file is damaged or is not one."""


class Calibration:
    """One collection's calibration values, as a ``sources.BlockSource`` (complete shard stores,
    given by their paths, or live forward passes), and their merged statistics."""

    def __init__(self, source: BlockSource | Sequence[str | os.PathLike]) -> None:
        """A source given is closed with this (a store source's files; a forward source has none)."""
        self.source: BlockSource = source if hasattr(source, "blocks") else StoreSource(source)
        self.stats = self.source.stats

    def __enter__(self) -> Calibration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()

    @property
    def tokens(self) -> int:
        return self.source.tokens

    def components(self) -> set[str]:
        """Every component some shard holds."""
        return {c for _, keys in self.source.shard_keys() for _, c in keys}

    def keys(self, components: Iterable[str], method: str) -> list[Key]:
        """Every (layer, component) of the given components, checked to be in every shard."""
        return [(layer, c) for c in components for layer in self.layers(c, method)]

    def layers(self, component: str, method: str) -> list[int]:
        shards = self.source.shard_keys()
        per_shard = [[layer for layer, c in keys if c == component] for _, keys in shards]
        lacking = [name for (name, _), layers in zip(shards, per_shard) if not layers]
        if lacking:
            raise MissingComponentError(
                f"method {method!r} needs component {component!r}, which the stores {lacking} lack "
                f"(they hold {sorted(self.components())}); collect it (see requirements())"
            )
        if any(layers != per_shard[0] for layers in per_shard):
            raise ValueError(f"the stores hold {component!r} for different layers: {per_shard}")
        return per_shard[0]


Calibrations = BlockSource | Sequence[str | os.PathLike]  # what Calibration reads
FitFn = Callable[[Calibration, np.ndarray, Options], dict[Key, np.ndarray]]


def _magnitude(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.abs().to(torch.float32)  # abs first: exact in 16 bits, and half the bytes


class _Importance:
    """CHESS's |a| * m_c (WINA's |x| * n_c), computed chunk by chunk in float32; the scale is
    kept so that a one-pass fit (``_scaled_quantiles``) can apply it after counting."""

    def __init__(self, scale: torch.Tensor) -> None:
        self.scale = scale

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        return _magnitude(chunk).mul_(self.scale.to(chunk.device))


def _sweep(
    source: BlockSource, streams: Mapping[Key, Transform], rows: int | None = None
) -> Iterator[tuple[str, Key, torch.Tensor]]:
    """One pass of the source: every stream's values once."""
    for shard, key, chunk in source.blocks(list(streams), rows):
        yield shard, key, streams[key](chunk)


def _nan_error(shard: str, key: Key) -> ValueError:
    return ValueError(f"{shard}: layer {key[0]} {key[1]!r} holds NaN values")


def _pass2_groups(sketches: dict[Key, QuantileSketch], budget: int) -> Iterator[list[Key]]:
    """Keys in groups whose pass-2 counts fit ``budget`` bytes (one key at least), each group
    formed only when the previous one is done, so one group's counts (and one key's) exist at once."""
    group: list[Key] = []
    size = 0
    for key in list(sketches):  # keys only: the caller drops each finished group's sketches
        need = sketches[key].pass2_bytes  # sets up this key's pass 2
        if group and size + need > budget:
            yield group
            group, size = [], 0
        group.append(key)
        size += need
    yield group


def _counted_quantiles(
    source: BlockSource, streams: Mapping[Key, Transform], qs: np.ndarray
) -> dict[Key, np.ndarray]:
    """The quantiles of the magnitude streams whose exact distribution the source knows
    without a pass (16-bit values counted by the shard jobs): the sketch's results bit for bit."""
    counted = {}
    for key, transform in streams.items():
        if transform is _magnitude and (counts := source.magnitude_counts(key)) is not None:
            counted[key] = histogram_quantiles(*counts, qs)
    return counted


def _scaled_quantiles(
    source: BlockSource, streams: Mapping[Key, Transform], qs: np.ndarray, budget: int
) -> dict[Key, np.ndarray]:
    """The quantiles of every importance stream of 16-bit values in one pass, from per-channel
    magnitude counts (``quantiles.ChannelMagnitudeCounts``), when those of all such streams fit
    ``budget`` bytes at once; else none (the sketch's two passes then fit them)."""
    scaled = {key: t for key, t in streams.items() if isinstance(t, _Importance)}
    if source.dtype not in (torch.float16, torch.bfloat16) or not scaled or sum(
            ChannelMagnitudeCounts.bytes_for(len(t.scale)) for t in scaled.values()) > budget:
        return {}
    counts = {key: ChannelMagnitudeCounts(len(t.scale), source.dtype) for key, t in scaled.items()}
    for shard, key, chunk in source.blocks(list(scaled)):
        try:
            counts[key].add(chunk)  # refuses NaN
        except ValueError as exc:
            raise _nan_error(shard, key) from exc
    return {key: counts.pop(key).quantiles(t.scale.numpy(), qs) for key, t in scaled.items()}


def _exact_quantiles(
    source: BlockSource, streams: Mapping[Key, Transform], qs: np.ndarray
) -> dict[Key, np.ndarray]:
    # a source whose passes cost a forward each holds more counts at once (sources.ForwardSource)
    budget = getattr(source, "pass2_bytes", _PASS2_BYTES)
    results = _counted_quantiles(source, streams, qs)
    results |= _scaled_quantiles(source, {k: t for k, t in streams.items() if k not in results}, qs, budget)
    streams = {key: transform for key, transform in streams.items() if key not in results}
    if not streams:
        return results
    sketches = {key: QuantileSketch(qs) for key in streams}
    for shard, key, values in _sweep(source, streams):
        try:
            sketches[key].add_pass1(values)  # refuses NaN
        except ValueError as exc:
            raise _nan_error(shard, key) from exc
    for group in _pass2_groups(sketches, budget):
        for _, key, values in _sweep(source, {key: streams[key] for key in group}):
            sketches[key].add_pass2(values)
        results |= {key: sketches[key].result() for key in group}
        for key in group:
            del sketches[key]  # frees its pass-2 counts before the next group's are made
    return results


def _per_sample_quantiles(
    source: BlockSource, streams: Mapping[Key, Transform], qs: np.ndarray, seq_len: int
) -> dict[Key, np.ndarray]:
    per_sample: dict[Key, list[np.ndarray]] = defaultdict(list)
    for shard, key, values in _sweep(source, streams, rows=seq_len):
        quantiles = np.percentile(values.cpu().numpy(), 100 * qs)
        if np.isnan(quantiles).any():
            raise _nan_error(shard, key)
        per_sample[key].append(quantiles)
    return {key: np.mean(quantiles, axis=0) for key, quantiles in per_sample.items()}


def _quantiles(
    calib: Calibration, streams: Mapping[Key, Transform], qs: np.ndarray, opts: Options
) -> dict[Key, np.ndarray]:
    if opts.quantile_mode == "per_sample":
        return _per_sample_quantiles(calib.source, streams, qs, opts.seq_len)
    return _exact_quantiles(calib.source, streams, qs)


def _fit_magnitudes(calib: Calibration, qs: np.ndarray, opts: Options) -> dict[Key, np.ndarray]:
    streams = {key: _magnitude for key in calib.keys(opts.masks, opts.method)}
    return _quantiles(calib, streams, qs, opts)


def _chess_scales(calib: Calibration, opts: Options) -> dict[int, torch.Tensor]:
    """m_c per layer, float32 as it multiplies |a|; all ones for a non-gated FFN."""
    layers = calib.layers("act", opts.method)
    if not opts.gated:
        if "up" in calib.components():
            raise ValueError("the stores hold 'up', so the model is gated: fit with gated=True")
        return {layer: torch.ones(calib.stats[layer, "act"].channels) for layer in layers}
    missing = sorted(set(layers) - set(calib.layers("up", opts.method)))
    if missing:
        raise MissingComponentError(f"method {opts.method!r} needs 'up' of layers {missing} for m_c")
    scales = {}
    for layer in layers:
        scale = calib.stats[layer, "up"].channel_mean_abs()
        if not np.isfinite(scale).all():
            raise ValueError(
                f"layer {layer} up: mean |u| is not finite (values past float16's range were "
                "stored as inf: store bfloat16)"
            )
        if len(scale) != calib.stats[layer, "act"].channels:
            raise ValueError(f"layer {layer}: up and act differ in channels")
        scales[layer] = torch.from_numpy(scale.astype(np.float32))
    return scales


def _chess_streams(calib: Calibration, opts: Options) -> tuple[dict[Key, Transform], dict[int, torch.Tensor]]:
    """Importance streams of act, magnitude streams of the other masked components, and m_c."""
    scales = _chess_scales(calib, opts)
    streams: dict[Key, Transform] = {(layer, "act"): _Importance(m) for layer, m in scales.items()}
    others = [c for c in opts.masks if c != "act"]
    streams |= {key: _magnitude for key in calib.keys(others, opts.method)}
    return streams, scales


def _channel_thresholds(scores: np.ndarray, scale: torch.Tensor) -> np.ndarray:
    """t_c = T / m_c per level; m_c = 0 gives inf (T > 0) or 0 (T = 0), see the module doc."""
    m = scale.numpy().astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = scores[:, None] / m
    return np.where((m == 0) & (scores[:, None] == 0), 0.0, t)


def _fit_chess(calib: Calibration, qs: np.ndarray, opts: Options) -> dict[Key, np.ndarray]:
    streams, scales = _chess_streams(calib, opts)
    fitted = _quantiles(calib, streams, qs, opts)
    for layer, scale in scales.items():
        fitted[layer, "act"] = _channel_thresholds(fitted[layer, "act"], scale)
    return fitted


def _fit_column_norm(calib: Calibration, qs: np.ndarray, opts: Options) -> dict[Key, np.ndarray]:
    """WINA: T = P_s(|x_c| * n_c) per key, t_c = T / n_c (n_c = 0 as m_c = 0 in chess)."""
    scales = {}
    for key in calib.keys(opts.masks, opts.method):
        norm = opts.column_norms.get(key) if opts.column_norms else None
        channels = calib.stats[key].channels
        if norm is None or np.shape(norm) != (channels,):
            raise ValueError(f"method {opts.method!r}: layer {key[0]} {key[1]!r} needs {channels} column norms, "
                             f"got {None if norm is None else np.shape(norm)}")
        scales[key] = torch.as_tensor(np.asarray(norm, dtype=np.float32))
    fitted = _quantiles(calib, {key: _Importance(scale) for key, scale in scales.items()}, qs, opts)
    return {key: _channel_thresholds(fitted[key], scale) for key, scale in scales.items()}


# the fit of each registry score: per key, thresholds shaped [levels] or [levels, channels]
FITS: dict[str, FitFn] = {"magnitude": _fit_magnitudes, "up_mean": _fit_chess, "column_norm": _fit_column_norm}


def needs_weights(method: str) -> bool:
    """Whether fitting ``method`` needs the model's weights (``fit(..., column_norms=...)``)."""
    return method_named(method).score == "column_norm"


def _levels(sparsities: Iterable[float]) -> np.ndarray:
    """Sorted distinct levels, each in [0, 1)."""
    values = list(sparsities)
    if not values:
        raise ValueError("no sparsity levels given")
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1]
    if bad:
        raise ValueError(f"sparsity levels must lie in [0, 1), got {bad}")
    return np.unique(np.asarray(values, dtype=np.float64))


def fit(
    method: str,
    calibration: Calibrations,
    sparsities: Iterable[float],
    params: Mapping[str, Any] | None = None,
    *,
    gated: bool = True,
    column_norms: Mapping[Key, np.ndarray] | None = None,
) -> dict[float, Thresholds]:
    """Thresholds of every (layer, masked component) for each sparsity, from the same passes over
    the calibration: the paths of its complete shard stores, or a ``sources.BlockSource``.

    ``gated`` says whether the model's FFN is gated (``Anatomy.gated``); see the module doc for
    what each method means without ``up``. ``column_norms``: for methods that ``needs_weights``,
    ``hooks.input_column_norms`` of the model.
    """
    opts = dataclasses.replace(options(method, params, gated), column_norms=column_norms)
    if needs_weights(method) and column_norms is None:
        raise ValueError(f"method {method!r} needs column_norms (hooks.input_column_norms of the model)")
    levels = _levels(sparsities)
    with Calibration(calibration) as calib:
        fitted = FITS[method_named(method).score](calib, levels, opts)
    for key, values in fitted.items():
        if np.isnan(values).any():
            raise ValueError(f"layer {key[0]} {key[1]!r}: a threshold is NaN (inf values in the stores)")
    return {
        float(s): {key: torch.tensor(np.zeros_like(v[i]) if s == 0 else v[i]) for key, v in fitted.items()}
        for i, s in enumerate(levels)
    }


def quantile_mode_difference(
    calibration: Calibrations, sparsities: Iterable[float], seq_len: int, *, gated: bool = True
) -> list[dict[str, float]]:
    """CHESS's per-layer score T in both quantile modes and ``|per_sample - exact| / exact``.

    One row per layer and sparsity; T before the sparsity-0 rule. Equal values give 0, a zero
    exact T with a nonzero per-sample one gives inf.
    """
    exact = options("chess", None, gated)
    sampled = options("chess", {"quantile_mode": "per_sample", "seq_len": seq_len}, gated)
    levels = _levels(sparsities)
    with Calibration(calibration) as calib:
        streams, _ = _chess_streams(calib, exact)
        by_exact = _quantiles(calib, streams, levels, exact)
        by_sample = _quantiles(calib, streams, levels, sampled)
    rows = []
    for (layer, _), e in sorted(by_exact.items()):
        p = by_sample[layer, "act"]
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(p == e, 0.0, np.abs(p - e) / e)
        rows += [
            {"layer": layer, "target_sparsity": float(s), "exact": float(e[i]), "per_sample": float(p[i]),
             "relative_difference": float(relative[i])}
            for i, s in enumerate(levels)
        ]
    return rows


def fit_metadata(
    method: str,
    sparsity: float,
    calibration: Calibrations,
    params: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The header of one fitted thresholds file (pass to ``save_thresholds``)."""
    mode = options(method, params, gated=True).quantile_mode
    with Calibration(calibration) as calib:
        tokens = calib.tokens
    return {
        "method": method,
        "target_sparsity": float(sparsity),
        "calibration_tokens": tokens,
        "quantile_definition": QUANTILE_DEFINITION,
        "quantile_mode": mode,
        "params": dict(params or {}),
        "provenance": dict(provenance or {}),
    }


def tensor_name(layer: int, component: str) -> str:
    return f"layers.{layer}.{component}"


def save_thresholds(path: str | os.PathLike, thresholds: Mapping[Key, Any], metadata: Mapping[str, Any]) -> None:
    """One sparsity's thresholds: per key a 0-d scalar or a per-channel vector."""
    tensors = {}
    for key, value in thresholds.items():
        t = torch.as_tensor(value, dtype=torch.float64)
        if t.dim() > 1:
            raise ValueError(f"threshold {key} must be a scalar or a per-channel vector, got {tuple(t.shape)}")
        tensors[key] = t
    _write(path, THRESHOLDS_FORMAT, tensors, metadata)


def load_thresholds(path: str | os.PathLike) -> tuple[Thresholds, dict[str, Any]]:
    """Thresholds keyed by (layer, component) and the metadata ``save_thresholds`` wrote."""
    return _read(path, THRESHOLDS_FORMAT)


def save_grid(path: str | os.PathLike, fitted: Mapping[float, Thresholds], metadata: Mapping[str, Any]) -> None:
    """Every level of one ``fit`` in one file: per key the levels' thresholds stacked on dim 0."""
    levels = sorted(fitted)
    if not levels:
        raise ValueError("no sparsity levels to save")
    keys = sorted(fitted[levels[0]])
    if any(sorted(fitted[s]) != keys for s in levels):
        raise ValueError("every level of a grid must have the same keys")
    tensors = {key: torch.stack([torch.as_tensor(fitted[s][key], dtype=torch.float64) for s in levels]) for key in keys}
    _write(path, GRID_FORMAT, tensors, {**metadata, "sparsities": [float(s) for s in levels]})


def read_grid(path: str | os.PathLike) -> tuple[dict[Key, torch.Tensor], np.ndarray, dict[str, Any]]:
    """Every level of a ``save_grid`` file: per key the stacked thresholds, the levels, the metadata."""
    tensors, metadata = _read(path, GRID_FORMAT)
    return tensors, np.asarray(metadata.pop("sparsities"), dtype=np.float64), metadata


def _level_index(levels: np.ndarray, sparsity: float, path: str | os.PathLike) -> int:
    matches = np.flatnonzero(np.isclose(levels, sparsity, rtol=0, atol=1e-9))
    if not matches.size:
        raise ValueError(f"sparsity {sparsity} is not in the grid of {path} ({len(levels)} levels, "
                         f"{levels.min():g} to {levels.max():g})")
    return int(matches[0])


def load_grid(path: str | os.PathLike, sparsity: float) -> tuple[Thresholds, dict[str, Any]]:
    """One level of a ``save_grid`` file, with its metadata (``target_sparsity`` set to the level)."""
    tensors, levels, metadata = read_grid(path)
    index = _level_index(levels, sparsity, path)
    return {key: t[index] for key, t in tensors.items()}, metadata | {"target_sparsity": float(levels[index])}


def save_allocation(
    path: str | os.PathLike, allocation: Mapping[Key, np.ndarray], levels: Sequence[float], metadata: Mapping[str, Any]
) -> None:
    """A per-(layer, component) sparsity for each target level (``actsparse.allocation``)."""
    tensors = {key: torch.as_tensor(np.asarray(v), dtype=torch.float64) for key, v in allocation.items()}
    _write(path, ALLOCATION_FORMAT, tensors, {**metadata, "sparsities": [float(s) for s in levels]})


def load_allocated(
    grid_path: str | os.PathLike, allocation_path: str | os.PathLike, sparsity: float
) -> tuple[Thresholds, dict[str, Any]]:
    """One target level of an allocation: each key's thresholds at its allocated level of the grid,
    with the grid's metadata and, under ``allocated_sparsity``, each key's level."""
    tensors, levels, metadata = read_grid(grid_path)
    allocation, info = _read(allocation_path, ALLOCATION_FORMAT)
    target = _level_index(np.asarray(info["sparsities"], dtype=np.float64), sparsity, allocation_path)
    if sorted(allocation) != sorted(tensors):
        raise ValueError(f"{allocation_path} allocates other keys than {grid_path} holds")
    chosen = {key: float(allocation[key][target]) for key in tensors}
    thresholds = {key: t[_level_index(levels, chosen[key], grid_path)] for key, t in tensors.items()}
    named = {tensor_name(*key): level for key, level in sorted(chosen.items())}
    return thresholds, metadata | {"target_sparsity": float(sparsity), "allocated_sparsity": named}


def _write(path: str | os.PathLike, fmt: str, tensors: Mapping[Key, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write atomically: a crash never leaves a half-written file that looks finished."""
    if not tensors:
        raise ValueError("no thresholds to save")
    if "format" in metadata:
        raise ValueError("metadata key 'format' is reserved for the file format")
    named = {tensor_name(*check_key(*key)): t.contiguous() for key, t in tensors.items()}
    header = {"format": fmt} | {name: json.dumps(value) for name, value in metadata.items()}
    write_safetensors(path, save(named, metadata=header))


def _read(path: str | os.PathLike, fmt: str) -> tuple[Thresholds, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no thresholds file at {path}")
    try:
        with safe_open(path, framework="pt") as file:
            header = dict(file.metadata() or {})
            if header.pop("format", None) != fmt:
                raise ThresholdFileError(f"{path}: not an {fmt} file")
            tensors = {_key_of(path, name): file.get_tensor(name) for name in file.keys()}
        header.pop(CHECKSUM, None)
        metadata = {name: json.loads(value) for name, value in header.items()}
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise ThresholdFileError(damage_report(path, f"not a readable thresholds file ({exc})")) from exc
    verify_safetensors(path)
    return tensors, metadata


def _key_of(path: Path, name: str) -> Key:
    match = _NAME.fullmatch(name)
    if match is None or match[2] not in COMPONENTS:
        raise ThresholdFileError(f"{path}: tensor {name!r} is not named layers.<layer>.<component>")
    return int(match[1]), match[2]
