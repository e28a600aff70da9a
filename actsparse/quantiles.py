"""Exact quantiles of float32 values streamed in chunks, in memory independent of their number.

Thresholds are percentiles of |v| over every calibration value of a (layer, component), which
can be billions of values spread over on-disk shards. Sorting them all is out of the question,
and an approximate sketch would make the fitted sparsity depend on the sketch. Instead two
passes over the data recover the exact order statistics:

* pass 1 counts values by the top 16 bits of their float32 bit pattern (sign, exponent and 7
  mantissa bits: 65,536 buckets). The buckets of finite floats are ordered like the values
  (negative buckets in reverse), so the cumulative counts tell which bucket holds each needed
  rank.
* pass 2 counts, for those few buckets only, the low 16 bits, which pins down the exact bit
  pattern, so the exact float32 value, of every needed rank.

Definition (numpy's default "linear" method, Hyndman & Fan type 7). For ``n`` values and a
quantile ``q`` in [0, 1], let ``q' = (100 * q) / 100`` in float64 (the round trip through a
percentage that ``numpy.percentile(values, 100 * q)`` performs), ``v = (n - 1) * q'``,
``i = floor(v)``. With ``x_(k)`` the k-th smallest float32 value (0-based) and ``a = x_(i)``,
``b = x_(i + 1)`` (both ``x_(n - 1)`` when ``v >= n - 1``, and then numpy's ``i = -1``):
``d = b - a`` in float32, ``g = v - i`` in float64, and the result is ``a + d * g`` when
``g < 0.5`` and ``b - d * (1 - g)`` otherwise, in float64. This is, bit for bit, what
``numpy.percentile(values_as_float32, 100 * numpy.asarray(qs))`` returns. Two consequences of
reproducing numpy exactly: +-inf values give inf or NaN where numpy does, and -0.0 and 0.0 are
distinct order statistics here (-0.0 first) while numpy leaves their order to its partition, so
a zero result may differ from numpy's in sign only.

Memory: 512 KiB for the pass-1 counts plus 128 KiB per distinct bucket holding a needed rank
(at most two per q, usually one: 16-bit counts, with a 32-bit carry row of which only the pages
of counts past 65,535 are ever touched; twice that while a large chunk is added), plus a few
copies of the current chunk, whatever the number of values.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from actsparse import native

Chunk = np.ndarray | torch.Tensor

_BUCKETS = 1 << 16
_SIGN_BUCKET = 0x8000  # first bucket of negative values (sign bit set)
# Position of the high and low 16-bit halves of a float32 seen as two uint16.
_HI, _LO = (1, 0) if sys.byteorder == "little" else (0, 1)
# Bucket ids in value order: negative buckets from the most negative (0xFFFF) down to -0.0's
# bucket (0x8000), then positive buckets upwards.
_BUCKETS_IN_ORDER = np.concatenate(
    [np.arange(_BUCKETS - 1, _SIGN_BUCKET - 1, -1), np.arange(_SIGN_BUCKET)]
)


def _float32_flat(chunk: Chunk) -> np.ndarray:
    """Flat native float32 numpy view of a chunk, copying (at most once) only when it must."""
    if isinstance(chunk, torch.Tensor):
        if chunk.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"chunk dtype {chunk.dtype} is not float32, float16 or bfloat16")
        return chunk.detach().to("cpu", torch.float32).reshape(-1).numpy()
    array = np.asarray(chunk)
    if array.dtype.kind != "f" or array.dtype.itemsize > 4:  # any byte order
        raise TypeError(
            f"chunk dtype {array.dtype} is not float32 or float16: quantiles are exact on float32"
            " values, so cast explicitly if rounding is intended"
        )
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1)


def _on_device(chunk: Chunk) -> bool:
    """Whether a chunk is counted by PyTorch ops where it lies (a GPU), so that only the counts,
    KiB-sized, leave the device (a chunk on the CPU is counted by numpy, its pass 2 in C where a
    compiler works)."""
    return isinstance(chunk, torch.Tensor) and chunk.device.type != "cpu"


def _device_halves(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 16 bits of each float32 bit pattern, as int64 tensors on the chunk's device."""
    words = chunk.detach().to(torch.float32).reshape(-1).view(torch.int32).long()
    return (words >> 16) & 0xFFFF, words & 0xFFFF


def _halves(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High and low 16 bits of each float32 bit pattern, as strided views (no copy)."""
    words = values.view(np.uint16)
    return words[_HI::2], words[_LO::2]


_NATIVE_SOURCE = r"""
#include <stdint.h>
/* Pass 1 of a host chunk in one sweep: each float32 bit pattern counted in its bucket (w >> 16).
   Returns how many were NaN (counted too: the caller discards these counts then). */
int64_t count_high_halves(const uint32_t *restrict words, int64_t n, int64_t *restrict counts) {
    int64_t nans = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t w = words[i];
        counts[w >> 16]++;
        nans += (w & 0x7FFFFFFFu) > 0x7F800000u;
    }
    return nans;
}
/* Pass 2 of a host chunk in one sweep, no temporaries: each float32 bit pattern w whose bucket
   (w >> 16) has a slot (1-based; 0: not needed) counts its low 16 bits in that slot's row, as
   low + 65536 * carry. Returns how many carries it made. */
int64_t count_low_halves(const uint32_t *restrict words, int64_t n, const uint32_t *restrict slot_of_bucket,
                         uint16_t *restrict low, uint32_t *restrict carry) {
    int64_t carries = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t w = words[i], slot = slot_of_bucket[w >> 16];
        if (slot) {
            int64_t j = (int64_t)(slot - 1) << 16 | (w & 0xFFFF);
            if (!++low[j]) {
                carry[j]++;
                carries++;
            }
        }
    }
    return carries;
}
"""


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The C pass-1 and pass-2 counts compiled for this machine; None (numpy instead) without a
    compiler. The numpy pass 2 sorts each chunk's hits (``np.unique``), several times the C
    sweep's time; its pass 1 copies the chunk's high halves into an index array first."""
    lib = native.load("quantile sketch", _NATIVE_SOURCE)
    if lib is not None:
        lib.count_low_halves.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.count_low_halves.restype = ctypes.c_int64
        lib.count_high_halves.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.count_high_halves.restype = ctypes.c_int64
    return lib


def _lerp(a: np.ndarray, b: np.ndarray, g: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation, same operations in the same dtypes (see module doc)."""
    with np.errstate(invalid="ignore", over="ignore"):
        d = b - a
        out = a + d * g
        np.subtract(b, d * (1 - g), out=out, where=g >= 0.5)
    return out


class QuantileSketch:
    """Exact quantiles of one stream of values, fed chunk by chunk in two passes.

    Feed every chunk to ``add_pass1``, then the same values again (any chunking, any order) to
    ``add_pass2``, then call ``result``. Sketches of the same qs fed with different shards merge
    with ``merge``: in pass 1 before pass 2 starts, or in pass 2 when they share one pass-1
    state (the merged one). Many sketches can be fed from one sweep over a store.
    """

    def __init__(self, qs: Sequence[float]) -> None:
        q = np.asarray(qs, dtype=np.float64).reshape(-1)
        if q.size == 0:
            raise ValueError("qs is empty")
        if not np.all((q >= 0) & (q <= 1)):
            raise ValueError(f"every q must lie in [0, 1], got {q.tolist()}")
        self.qs = q
        self._q_percentile = np.true_divide(q * 100, 100)
        self._counts = np.zeros(_BUCKETS, dtype=np.int64)
        self._pass2: _Pass2 | None = None

    @property
    def count(self) -> int:
        """Number of values seen in pass 1."""
        return int(self._counts.sum())

    def add_pass1(self, chunk: Chunk) -> None:
        """Count a chunk's values by bucket; NaN is refused since it has no rank."""
        if self._pass2 is not None:
            raise RuntimeError("add_pass1 after pass 2 started")
        if _on_device(chunk):
            if chunk.isnan().any():
                raise ValueError("chunk contains NaN: quantiles of NaN are undefined")
            high = _device_halves(chunk)[0]
            self._counts += torch.bincount(high, minlength=_BUCKETS).cpu().numpy()
            return
        values = np.ascontiguousarray(_float32_flat(chunk))
        lib = native_library()
        if lib is not None:
            counts = np.zeros(_BUCKETS, dtype=np.int64)  # kept only if the chunk holds no NaN
            if lib.count_high_halves(values.ctypes.data, values.size, counts.ctypes.data):
                raise ValueError("chunk contains NaN: quantiles of NaN are undefined")
            self._counts += counts
            return
        if np.isnan(values).any():
            raise ValueError("chunk contains NaN: quantiles of NaN are undefined")
        self._counts += np.bincount(_halves(values)[0], minlength=_BUCKETS)

    @property
    def needed_buckets(self) -> np.ndarray:
        """Buckets (top 16 bits of float32 bit patterns) pass 2 counts, in value order.

        Asking ends pass 1: the buckets depend on the final pass-1 counts.
        """
        return self._start_pass2().buckets

    def add_pass2(self, chunk: Chunk) -> None:
        """Count the low 16 bits of a chunk's values that fall in a needed bucket."""
        pass2 = self._start_pass2()
        if _on_device(chunk):
            pass2.add_on_device(chunk)
        else:
            pass2.add(_float32_flat(chunk))

    @property
    def pass2_bytes(self) -> int:
        """Bytes pass 2's counts hold. Asking ends pass 1, like ``needed_buckets``."""
        return self._start_pass2().counts_bytes

    def merge(self, other: QuantileSketch) -> None:
        """Add another sketch's counts (another shard of the same stream) into this one."""
        if not np.array_equal(self.qs, other.qs):
            raise ValueError("cannot merge sketches of different qs")
        if self._pass2 is None and other._pass2 is None:
            self._counts += other._counts
        elif self._pass2 is not None and other._pass2 is not None:
            if not np.array_equal(self._counts, other._counts):
                raise ValueError("cannot merge pass-2 sketches built on different pass-1 counts")
            self._pass2.merge(other._pass2)
        else:
            raise ValueError("cannot merge a sketch in pass 1 with one in pass 2")

    def result(self) -> np.ndarray:
        """One float64 per q, equal to numpy.percentile(values, 100 * qs) (see module doc)."""
        pass2 = self._start_pass2()
        v, lower, upper = self._indices(pass2.expected_total)
        a, b = np.split(pass2.order_statistics(np.concatenate([lower, upper])), 2)
        return _lerp(a, b, v - lower)

    def _indices(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """numpy's virtual index and its two neighbours, -1 (the last value) past the end."""
        v = (n - 1) * self._q_percentile
        above = v >= n - 1
        lower = np.where(above, -1, np.floor(v)).astype(np.int64)
        return v, lower, np.where(above, -1, lower + 1)

    def _start_pass2(self) -> _Pass2:
        """Freeze the pass-1 counts and set up pass 2 for the ranks numpy reads."""
        if self._pass2 is None:
            n = self.count
            if n == 0:
                raise ValueError("no values: quantiles of an empty input are undefined")
            self._pass2 = _Pass2(self._counts, np.concatenate(self._indices(n)[1:]))
        return self._pass2


class _Pass2:
    """Low-16-bit counts of the buckets holding the needed ranks, and the ranks' lookup."""

    def __init__(self, counts: np.ndarray, ranks: np.ndarray) -> None:
        ordered = counts[_BUCKETS_IN_ORDER]
        self._ends = np.cumsum(ordered)  # values up to and including each bucket, in order
        self.expected_total = int(self._ends[-1])
        ranks = ranks % self.expected_total
        self._positions = np.unique(self._ends.searchsorted(ranks, side="right"))
        self.buckets = _BUCKETS_IN_ORDER[self._positions]
        self._expected = ordered[self._positions]
        self._slot_of_bucket = np.zeros(_BUCKETS, np.uint32)  # 1-based slot of each needed bucket, else 0
        self._slot_of_bucket[self.buckets] = np.arange(1, len(self.buckets) + 1)
        # Counts as low + 65536 * carry: the fresh pages a pass 2 faults in (which dominated a
        # storeless CHESS fit's, 25 ns a value in 64-bit counts, not 6) are the 16-bit rows', the
        # carry rows' only where a count passes 65,535 (zeroed memory is mapped untouched)
        shape = (len(self.buckets), _BUCKETS)
        self._low, self._carry = np.zeros(shape, np.uint16), np.zeros(shape, np.uint32)
        self._carries = 0  # none: the carry rows are all zero, and never read
        self._device_counts: torch.Tensor | None = None  # counts kept where the chunks lie
        self._total = 0

    @property
    def counts_bytes(self) -> int:
        """The 16-bit rows' bytes (the carry rows' pages are touched only by counts past 65,535)."""
        return self._low.nbytes

    def _counts(self, rows: int | slice = slice(None)) -> np.ndarray:
        """int64 counts of the needed buckets' low halves (one bucket's row, or all)."""
        counts = self._low[rows].astype(np.int64)
        if self._carries:
            counts += self._carry[rows].astype(np.int64) << 16
        return counts

    def _add_counts(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at the distinct flat (slot << 16 | low) ``keys``."""
        low, carry = self._low.reshape(-1), self._carry.reshape(-1)
        total = low[keys] + counts.astype(np.int64)
        low[keys] = total & 0xFFFF
        carried = total >> 16
        carry[keys] += carried.astype(np.uint32)
        self._carries += int(np.count_nonzero(carried))

    def add(self, values: np.ndarray) -> None:
        lib = native_library()
        if lib is not None:
            values = np.ascontiguousarray(values)
            self._carries += lib.count_low_halves(values.ctypes.data, values.size, self._slot_of_bucket.ctypes.data,
                                                  self._low.ctypes.data, self._carry.ctypes.data)
            self._total += values.size
            return
        high, low = _halves(values)
        slots = np.take(self._slot_of_bucket, high)
        hits = np.flatnonzero(slots)
        self._add_counts(*np.unique((slots[hits].astype(np.intp) - 1) << 16 | low[hits], return_counts=True))
        self._total += values.size

    def add_on_device(self, chunk: torch.Tensor) -> None:
        """``add`` with PyTorch ops on the chunk's device, the counts staying there until read."""
        high, low = _device_halves(chunk)
        if self._device_counts is None:
            self._slot_table = torch.from_numpy(self._slot_of_bucket.astype(np.int64)).to(chunk.device)
            self._device_counts = torch.zeros(self._low.size, dtype=torch.int64, device=chunk.device)
        slots = self._slot_table[high]
        hits = slots > 0
        keys = (slots[hits] - 1) << 16 | low[hits]
        self._device_counts += torch.bincount(keys, minlength=self._device_counts.numel())
        self._total += chunk.numel()

    def _gather(self) -> None:
        """Fold the device's counts into the host's."""
        if self._device_counts is not None:
            counts = self._device_counts.cpu().numpy()
            keys = np.flatnonzero(counts)
            self._add_counts(keys, counts[keys])
            self._device_counts = None

    def merge(self, other: _Pass2) -> None:
        self._gather()
        other._gather()
        counts = other._counts().reshape(-1)
        keys = np.flatnonzero(counts)
        self._add_counts(keys, counts[keys])
        self._total += other._total

    def order_statistics(self, ranks: np.ndarray) -> np.ndarray:
        """float32 values of the given 0-based ranks (-1: the last), from both passes' counts."""
        self._gather()
        self._check_complete()
        ranks = ranks % self.expected_total
        slots = self._positions.searchsorted(self._ends.searchsorted(ranks, side="right"))
        offsets = ranks - (self._ends[self._positions] - self._expected)[slots]
        bits = np.empty(len(ranks), dtype=np.uint32)
        for slot in np.unique(slots):  # one cumulative count per bucket, however many ranks it holds
            at = slots == slot
            bits[at] = self._bits(int(slot), offsets[at])
        return bits.view(np.float32)

    def _bits(self, slot: int, offsets: np.ndarray) -> np.ndarray:
        """Bit patterns of the values ``offsets`` places (0-based) into needed bucket ``slot``."""
        bucket = int(self.buckets[slot])
        negative = bucket >= _SIGN_BUCKET  # larger low bits are smaller values
        counts = self._counts(slot)
        low = np.cumsum(counts[::-1] if negative else counts).searchsorted(offsets, side="right")
        return bucket << 16 | (_BUCKETS - 1 - low if negative else low)

    def _check_complete(self) -> None:
        """Pass 2 must have seen exactly pass 1's values, else the ranks point at wrong values."""
        seen = self._low.sum(axis=1, dtype=np.int64)
        if self._carries:
            seen += self._carry.sum(axis=1, dtype=np.int64) << 16
        if self._total != self.expected_total or not np.array_equal(seen, self._expected):
            raise ValueError(
                f"pass 2 saw {self._total} values ({seen.tolist()} in the needed buckets) where"
                f" pass 1 saw {self.expected_total} ({self._expected.tolist()}): feed the same"
                " values to both passes"
            )


def histogram_quantiles(values: np.ndarray, counts: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """What ``QuantileSketch(qs)`` returns for a stream holding ``values[i]`` ``counts[i]`` times,
    from that histogram alone, so one pass over the data (which made it) is enough.

    ``values``: distinct float32 values (a 16-bit float's magnitudes, say); those counted at
    least once must be non-negative and not NaN.
    Their order statistics are exact, and the interpolation is the sketch's own, so the result
    equals the sketch's bit for bit.
    """
    values = np.asarray(values)
    counts = np.asarray(counts, dtype=np.int64)
    if values.dtype != np.float32 or values.shape != counts.shape or values.ndim != 1:
        raise ValueError("values must be 1-D float32, counts int64 of the same shape")
    held = counts > 0  # values counted 0 times (NaN patterns, say) play no part
    values, counts = values[held], counts[held]
    if np.isnan(values).any() or np.signbit(values).any():
        raise ValueError("histogram values must be non-negative and not NaN")
    order = np.argsort(values)
    ordered, ends = values[order], np.cumsum(counts[order])
    if len(np.unique(ordered)) != len(ordered):
        raise ValueError("histogram values must be distinct")
    sketch = QuantileSketch(qs)
    if not len(ends):
        raise ValueError("no values: quantiles of an empty input are undefined")
    n = int(ends[-1])
    v, lower, upper = sketch._indices(n)

    def order_statistics(ranks: np.ndarray) -> np.ndarray:
        return ordered[ends.searchsorted(ranks % n, side="right")]

    return _lerp(order_statistics(lower), order_statistics(upper), v - lower)


def exact_quantiles(chunks: Callable[[], Iterable[Chunk]], qs: Sequence[float]) -> np.ndarray:
    """Exact quantiles (one float64 per q) of every value ``chunks()`` yields; called twice."""
    sketch = QuantileSketch(qs)
    for chunk in chunks():
        sketch.add_pass1(chunk)
    for chunk in chunks():
        sketch.add_pass2(chunk)
    return sketch.result()
