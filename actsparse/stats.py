"""Streaming statistics of stored activations, per (layer, component), mergeable across shards.

Collected batch by batch while a shard is written, so threshold fitting and reports get
distribution summaries without another pass over the store, and shards combine by addition.

Per (layer, component), on the values *as stored* (float16 or bfloat16):

* ``hist``: int64 counts of ``|x|`` over fixed bins shared by every key, shard and model, so any
  two histograms add. Layout (``NBINS`` = 123):

  - ``ZERO_BIN`` (0): exact zeros (+0 and -0);
  - ``UNDERFLOW_BIN`` (1): ``0 < |x| < EDGES[0]``;
  - ``2 + j``: ``EDGES[j] <= |x| < EDGES[j + 1]``, 120 log-spaced bins, 10 per decade;
  - ``OVERFLOW_BIN`` (122): ``|x| >= EDGES[-1]``, inf included.

  All bins are half-open on the right, so the count below any edge is exact: the fraction of
  values a threshold equal to that edge zeroes. Total and zero counts are read off ``hist``.
* ``sum_abs``: float64 per-channel sums of ``|x|`` (CHESS's ``m_c = mean|u_c|``), kept only for
  the components a writer is told to sum (``StoreStats(summed=...)``: the workflow passes the
  components a method reads for its scales, CHESS's ``up``); nothing else reads them, and they
  are most of a storeless shard summary's bytes. Without them a key still knows its channels.
  Files hold them compressed (``compressor()``, lossless: the float64 values come back bit for bit).

The histogram is exact and cheap because a 16-bit float has only 32,768 magnitudes: one bincount
of the bit patterns with the sign cleared, then a fixed table from magnitude to bin.

The per-channel sums are float64, computed over blocks of at most ``SUM_BLOCK_VALUES`` values:
a block's float64 copy stays in cache, which makes them five times cheaper (~2 ns per value on
one core) than upcasting a whole batch, whose float64 copy streams through memory twice. Float32
sums would halve that again but are off by ~1e-7 relatively, one float32 unit: enough to change
CHESS's float32 ``m_c``, so its thresholds would no longer equal the formula's. In float64,
the relative error of a sum is at most ``rows * 2**-53``.

On the CPU both come from one small C function (``native``), one pass over the values: ~1.5 ns
per value against ~4 ns for the PyTorch ops, which stay the path on a GPU and where no C compiler
works. Its counts are identical and its sums, accumulated row by row in float64, agree to
``rows * 2**-53`` as well.

``summarize`` computes one batch's contribution on the batch's device (a GPU included) and
moves only the counts and sums to the host; ``add`` folds it in. Store writers split the two:
the summary is computed wherever the values are, the folding happens on the writer thread.

NaN values are refused: they have no place in a magnitude histogram and always mean a bug
upstream.

Files: one safetensors file per store holds every key's arrays; its JSON header holds the format,
the list of keys and the checksum that loading verifies. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import numbers
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save

from actsparse import native
from actsparse.anatomy import COMPONENTS
from actsparse.provenance import verify_safetensors, write_safetensors

Key = tuple[int, str]  # (layer index, component)

EDGES = np.logspace(-8, 4, 121)
ZERO_BIN = 0
UNDERFLOW_BIN = 1
OVERFLOW_BIN = len(EDGES) + 1
NBINS = len(EDGES) + 2
STATS_FORMAT = "actsparse.stats/3"
_READABLE_FORMATS = ("actsparse.stats/2", STATS_FORMAT)  # 2: every key has its sums
STATS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUM_BLOCK_VALUES = 1 << 17  # values summed at a time: 1 MiB of float64, cache-resident
PATTERNS = 1 << 15  # bit patterns of a 16-bit float's magnitude
_NAN_SLOT = NBINS  # where NaN magnitudes land in the lookup table, one past the real bins
_SUMS_PART = "sum_abs.blosc"  # the compressed sums' array name in a file (format 3)


@functools.cache
def compressor():
    """The lossless codec of the compressed arrays of statistics and shard-summary files (bit-
    shuffled zstd: float64 sums shrink by ~45%, sparse magnitude counts by ~20x)."""
    import numcodecs  # not at import: the workflow's parse reads this module's constants only

    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


def check_key(layer: int, component: str) -> Key:
    """Validate a (layer, component) key early, so a typo fails where it is made."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
    return int(layer), component


def array_name(layer: int, component: str) -> str:
    """The name of a key's array in stores and stats files."""
    return f"layers/{layer}/{component}"


@functools.cache
def _magnitude_bins(dtype: torch.dtype) -> np.ndarray:
    """Bin of every non-negative bit pattern of a 16-bit float dtype (``_NAN_SLOT`` for NaN)."""
    magnitudes = torch.arange(PATTERNS, dtype=torch.int32).to(torch.int16).view(dtype)
    values = magnitudes.to(torch.float64).numpy()
    bins = 1 + np.searchsorted(EDGES, values, side="right")
    bins[values == 0] = ZERO_BIN
    bins[np.isnan(values)] = _NAN_SLOT
    return bins


@dataclass(frozen=True)
class BatchSummary:
    """What one batch adds to a key's statistics, on the host: ``TensorStats.add`` folds it in."""

    dtype: torch.dtype
    channels: int
    patterns: np.ndarray | None  # int64 [32768]: values per magnitude bit pattern (16-bit dtypes)
    sum_abs: np.ndarray | None  # float64 [channels]; None where the key keeps no sums
    bins: np.ndarray | None = None  # float32: int64 [NBINS + 1], the hist and then the NaN count

    def per_bin(self) -> np.ndarray:
        """Counts per histogram bin, the NaN count last."""
        if self.patterns is None:
            return self.bins
        # float weights count exactly up to 2**53 values per pattern
        return np.bincount(_magnitude_bins(self.dtype), weights=self.patterns, minlength=NBINS + 1)


_NATIVE_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#define TABLES 4 /* interleaved count tables: runs of one value (zeros) never wait on one counter */
#define BLOCK (1LL << 30) /* values per flush, so no uint32 count overflows */

/* Adds a row-major [rows, cols] array of 16-bit floats (their bit patterns) into patterns (the
   count of each magnitude bit pattern, sign cleared) and per-column float64 sums of |x|,
   magnitude[p] being the value of pattern p; sum_abs NULL: no sums. Returns -1 if out of memory,
   else 0. */
int summarize16(const uint16_t *restrict x, int64_t rows, int64_t cols, const float *restrict magnitude,
                int64_t *restrict patterns, double *restrict sum_abs) {
    uint32_t (*counts)[32768] = calloc(TABLES, sizeof *counts);
    if (!counts) return -1;
    int64_t n = rows * cols;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t stop = n - start < BLOCK ? n : start + BLOCK, i = start;
        for (; i + TABLES <= stop; i += TABLES)
            for (int t = 0; t < TABLES; t++) counts[t][x[i + t] & 0x7fff]++;
        for (; i < stop; i++) counts[0][x[i] & 0x7fff]++;
        for (int p = 0; p < 32768; p++)
            for (int t = 0; t < TABLES; t++) { patterns[p] += counts[t][p]; counts[t][p] = 0; }
    }
    free(counts);
    for (int64_t r = 0; sum_abs && r < rows; r++) {
        const uint16_t *row = x + r * cols;
        for (int64_t c = 0; c < cols; c++) sum_abs[c] += magnitude[row[c] & 0x7fff];
    }
    return 0;
}
"""


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The C summary compiled for this machine; None (PyTorch ops instead) without a compiler."""
    lib = native.load("stats summary", _NATIVE_SOURCE)
    if lib is not None:
        lib.summarize16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, *[ctypes.c_void_p] * 3]
        lib.summarize16.restype = ctypes.c_int
    return lib


@functools.cache
def pattern_magnitudes(dtype: torch.dtype) -> torch.Tensor:
    """float32 value of every non-negative bit pattern of a 16-bit float dtype (exact)."""
    return torch.arange(PATTERNS, dtype=torch.int32).to(torch.int16).view(dtype).float()


def summarize(batch: torch.Tensor, use_native: bool = True, sums: bool = True) -> BatchSummary:
    """A ``[tokens, channels]`` float16/bfloat16 batch's counts and, with ``sums``, its channel
    sums, computed on its device (on the CPU by the C function unless ``use_native`` is False or
    it could not be built). Without sums a batch costs one pass over its values, not two."""
    if batch.ndim != 2:
        raise ValueError(f"batch must be 2-D [tokens, channels], got shape {list(batch.shape)}")
    if batch.dtype not in STATS_DTYPES:
        raise ValueError(f"stats take stored values (float16, bfloat16, float32), got {batch.dtype}")
    if batch.dtype == torch.float32:
        return _summarize_float32(batch.detach(), sums)
    if use_native and batch.device.type == "cpu" and native_library() is not None:
        return _summarize_native(batch.detach().contiguous(), sums)
    magnitudes = batch.detach().view(torch.int16) & 0x7FFF  # |x|: the sign bit cleared
    patterns = torch.bincount(magnitudes.reshape(-1), minlength=PATTERNS)
    sum_abs = None
    if sums:
        sum_abs = torch.zeros(batch.shape[1], dtype=torch.float64, device=batch.device)
        for block in magnitudes.split(max(1, SUM_BLOCK_VALUES // max(1, batch.shape[1]))):
            sum_abs += block.view(batch.dtype).double().sum(0)
        sum_abs = sum_abs.cpu().numpy()
    return BatchSummary(batch.dtype, batch.shape[1], patterns.cpu().numpy(), sum_abs)


@functools.cache
def _edges_on(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(EDGES).to(device)


def _summarize_float32(batch: torch.Tensor, sums: bool) -> BatchSummary:
    """float32 values have too many magnitudes to count each: their bins come from comparing
    with the edges in float64, block by block like the sums (PyTorch ops, on the batch's device)."""
    counts = torch.zeros(NBINS + 1, dtype=torch.int64, device=batch.device)
    sum_abs = torch.zeros(batch.shape[1], dtype=torch.float64, device=batch.device) if sums else None
    for block in batch.split(max(1, SUM_BLOCK_VALUES // max(1, batch.shape[1]))):
        values = block.abs().double().contiguous()  # bucketize wants contiguous values
        bins = 1 + torch.bucketize(values, _edges_on(batch.device), right=True)
        bins = bins.masked_fill_(values == 0, ZERO_BIN).masked_fill_(values.isnan(), _NAN_SLOT)
        counts += torch.bincount(bins.reshape(-1), minlength=NBINS + 1)
        if sum_abs is not None:
            sum_abs += values.sum(0)
    return BatchSummary(batch.dtype, batch.shape[1], None, None if sum_abs is None else sum_abs.cpu().numpy(),
                        counts.cpu().numpy())


def _summarize_native(batch: torch.Tensor, sums: bool) -> BatchSummary:
    patterns = np.zeros(PATTERNS, dtype=np.int64)
    sum_abs = np.zeros(batch.shape[1], dtype=np.float64) if sums else None
    status = native_library().summarize16(
        batch.data_ptr(), batch.shape[0], batch.shape[1], pattern_magnitudes(batch.dtype).data_ptr(),
        patterns.ctypes.data, None if sum_abs is None else sum_abs.ctypes.data,
    )
    if status:
        raise MemoryError("no memory for the statistics' count tables")
    return BatchSummary(batch.dtype, batch.shape[1], patterns, sum_abs)


@contextlib.contextmanager
def _naming(key: Key) -> Iterator[None]:
    """Prefix a refused batch's error with its key, so a failure in a long run is traceable."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"layer {key[0]} {key[1]}: {exc}") from None


class TensorStats:
    """Statistics of one (layer, component): magnitude histogram and, if kept, per-channel sums."""

    def __init__(self, hist: np.ndarray, sum_abs: np.ndarray | None, channels: int | None = None) -> None:
        if hist.shape != (NBINS,) or hist.dtype != np.int64:
            raise ValueError(f"hist must be int64 [{NBINS}], got {hist.dtype} {hist.shape}")
        if sum_abs is not None and (sum_abs.ndim != 1 or sum_abs.dtype != np.float64):
            raise ValueError(f"sum_abs must be 1-D float64, got {sum_abs.dtype} {sum_abs.shape}")
        if sum_abs is None and channels is None:
            raise ValueError("stats without channel sums need their channel count")
        if sum_abs is not None and channels not in (None, len(sum_abs)):
            raise ValueError(f"{channels} channels but {len(sum_abs)} channel sums")
        self.hist = hist
        self.sum_abs = sum_abs
        self.channels = len(sum_abs) if sum_abs is not None else int(channels)

    @classmethod
    def empty(cls, channels: int, sums: bool = True) -> TensorStats:
        sum_abs = np.zeros(channels, dtype=np.float64) if sums else None
        return cls(np.zeros(NBINS, dtype=np.int64), sum_abs, channels)

    @property
    def count(self) -> int:
        return int(self.hist.sum())

    @property
    def zeros(self) -> int:
        return int(self.hist[ZERO_BIN])

    @property
    def tokens(self) -> int:
        return self.count // self.channels

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self._nonempty_count()

    def update(self, batch: torch.Tensor) -> None:
        """Add a ``[tokens, channels]`` float16/bfloat16 batch; a refused batch changes nothing."""
        self.add(summarize(batch))

    def add(self, summary: BatchSummary) -> None:
        """Fold in a batch's summary; a refused one (NaN values, other channels) changes nothing."""
        if summary.channels != self.channels:
            raise ValueError(f"batch has {summary.channels} channels, earlier ones {self.channels}")
        per_bin = summary.per_bin()
        if per_bin[_NAN_SLOT]:
            raise ValueError(f"batch holds {int(per_bin[_NAN_SLOT])} NaN values")
        if self.sum_abs is not None and summary.sum_abs is None:
            raise ValueError("batch summary has no channel sums, which these statistics keep")
        self.hist += per_bin[:NBINS].astype(np.int64)
        if self.sum_abs is not None:
            self.sum_abs += summary.sum_abs

    def merge(self, other: TensorStats) -> None:
        """Add another shard's statistics of the same key into these."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        if (other.sum_abs is None) != (self.sum_abs is None):
            raise ValueError("cannot merge statistics with channel sums and statistics without")
        self.hist += other.hist
        if self.sum_abs is not None:
            self.sum_abs += other.sum_abs

    def channel_mean_abs(self) -> np.ndarray:
        """mean |x| per channel over all tokens (CHESS's ``m_c`` when this key is ``up``)."""
        if self.sum_abs is None:
            raise ValueError("no channel sums were kept for this key (collect it as a component a "
                             "method reads, or rerun its collection)")
        return self.sum_abs / self._nonempty_tokens()

    def cdf_at(self, points: np.ndarray | float) -> np.ndarray:
        """Fraction of values with ``|x| < p``: the sparsity a threshold ``p`` would give.

        Exact at the edges and at 0; between two edges interpolated linearly in log10(p), below
        the first edge linearly in p. Overflow values never count as below: past the last edge
        the curve stays at the fraction below it.
        """
        p = np.asarray(points, dtype=np.float64)
        if np.isnan(p).any():
            raise ValueError("cdf_at points must not be NaN")
        below = np.cumsum(self.hist) - self.hist  # values in the bins before each bin
        at_edges = below[UNDERFLOW_BIN + 1 :]
        in_log_bins = np.interp(np.log10(np.maximum(p, EDGES[0])), np.log10(EDGES), at_edges)
        underflow_share = np.clip(p / EDGES[0], 0, 1)
        in_underflow = below[UNDERFLOW_BIN] + self.hist[UNDERFLOW_BIN] * underflow_share
        counts = np.where(p >= EDGES[0], in_log_bins, np.where(p > 0, in_underflow, 0.0))
        return counts / self._nonempty_count()

    def _nonempty_count(self) -> int:
        if not self.count:
            raise ValueError("no values were added to these stats")
        return self.count

    def _nonempty_tokens(self) -> int:
        self._nonempty_count()
        return self.tokens


class StoreStats:
    """The statistics of every (layer, component) of one store (or of merged shards)."""

    def __init__(self, summed: Collection[str] | None = None) -> None:
        """``summed``: the components whose channel sums ``add`` keeps (None: every component)."""
        self._stats: dict[Key, TensorStats] = {}
        self._summed = None if summed is None else frozenset(summed)

    def __getitem__(self, key: Key) -> TensorStats:
        try:
            return self._stats[key]
        except KeyError:
            raise KeyError(f"no stats for layer {key[0]} component {key[1]!r}") from None

    def __contains__(self, key: Key) -> bool:
        return key in self._stats

    def __iter__(self) -> Iterator[Key]:
        return iter(sorted(self._stats))

    def __len__(self) -> int:
        return len(self._stats)

    def sums(self, component: str) -> bool:
        """Whether the statistics keep channel sums of a component (so its summaries need them)."""
        return self._summed is None or component in self._summed

    def update(self, layer: int, component: str, batch: torch.Tensor) -> None:
        """Add a ``[tokens, channels]`` float16/bfloat16 batch of one key."""
        key = check_key(layer, component)
        with _naming(key):
            summary = summarize(batch, sums=self.sums(component))
        self.add(*key, summary)

    def add(self, layer: int, component: str, summary: BatchSummary) -> None:
        """Fold in a batch's summary (from ``summarize``, possibly computed on another device)."""
        key = check_key(layer, component)
        stats = self._stats.get(key) or TensorStats.empty(summary.channels, self.sums(key[1]))
        with _naming(key):
            stats.add(summary)
        self._stats[key] = stats

    def merge(self, other: StoreStats) -> None:
        """Add another shard's statistics; keys only ``other`` has are copied in."""
        for key in other:
            mine = self._stats.setdefault(key, TensorStats.empty(other[key].channels, other[key].sum_abs is not None))
            mine.merge(other[key])

    def save(self, path: str | os.PathLike, extra: Mapping[str, np.ndarray] | None = None,
             header: Mapping[str, str] | None = None) -> None:
        """Write one safetensors file, atomically (a crash never leaves a half-written file);
        ``extra`` arrays and ``header`` entries travel beside the statistics (``load`` skips them)."""
        path = Path(path)
        arrays = {"edges": EDGES, **(extra or {})}
        for key, stats in self._stats.items():
            name = array_name(*key)
            arrays[f"{name}/hist"] = stats.hist
            if stats.sum_abs is not None:
                arrays[f"{name}/{_SUMS_PART}"] = np.frombuffer(compressor().encode(stats.sum_abs), np.uint8)
        keys = sorted(self._stats)
        metadata = {**(header or {}), "format": STATS_FORMAT, "keys": json.dumps(keys),
                    "channels": json.dumps([self._stats[key].channels for key in keys]),
                    "sums_codec": json.dumps(compressor().get_config())}
        write_safetensors(path, save(arrays, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> StoreStats:
        with safe_open(path, framework="numpy") as file:
            header = file.metadata() or {}
            if header.get("format") not in _READABLE_FORMATS:
                found = header.get("format")
                raise ValueError(f"{path}: not an {STATS_FORMAT} file (format {found!r}); "
                                 "delete it and rerun the workflow to rewrite it")
            if not np.array_equal(file.get_tensor("edges"), EDGES):
                raise ValueError(f"{path}: histogram edges differ from this version's EDGES")
            verify_safetensors(path)  # before decoding: damaged compressed bytes name the file
            keys = json.loads(header["keys"])
            channels = json.loads(header.get("channels", "null")) or [None] * len(keys)  # format 2: from the sums
            names = set(file.keys())
            stats = cls()
            for (layer, component), width in zip(keys, channels, strict=True):
                name = array_name(layer, component)
                sum_abs = None
                if f"{name}/{_SUMS_PART}" in names:
                    encoded = file.get_tensor(f"{name}/{_SUMS_PART}").tobytes()
                    sum_abs = np.frombuffer(compressor().decode(encoded), np.float64).copy()  # writable: merges add
                elif f"{name}/sum_abs" in names:  # format 2
                    sum_abs = file.get_tensor(f"{name}/sum_abs")
                stats._stats[check_key(layer, component)] = TensorStats(file.get_tensor(f"{name}/hist"), sum_abs, width)
        return stats
