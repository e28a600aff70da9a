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

Where the values are per-channel multiples of 16-bit magnitudes (CHESS's importance ``|a| * m_c``),
``ChannelMagnitudeCounts`` counts each channel's magnitudes in one pass over the data instead,
and the sketch's two passes then run over those counts (in C, or ``histogram_quantiles``).

Memory: 512 KiB for the pass-1 counts plus 128 KiB per distinct bucket holding a needed rank
(at most two per q, usually one: 16-bit counts, with a 32-bit carry row of which only the pages
of counts past 65,535 are ever touched; twice that while a large chunk is added), plus a few
copies of the current chunk, whatever the number of values.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from actsparse import native
from actsparse.stats import PATTERNS, pattern_magnitudes

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
#include <string.h>
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
/* One [rows, channels] block of 16-bit floats (bit patterns, row-major) counted per channel
   and magnitude (sign cleared) in rows of 32,768 one-byte counts: a count wrapping past 255
   writes its cell to wraps (room for one per value), and the number written is returned.
   Channels go 32 at a time, so the counts written stay within 32 rows (1 MiB) while the
   block's rows stream past. Magnitudes above nan_floor (the dtype's infinity) are NaN: their
   number goes to *nans (counted too: the caller discards these counts then). */
int64_t count_channel_magnitudes(const uint16_t *restrict values, int64_t rows, int64_t channels,
                                 uint8_t *restrict low, int32_t *restrict wraps, uint32_t nan_floor,
                                 int64_t *restrict nans) {
    int64_t written = 0, nan_count = 0;
    for (int64_t first = 0; first < channels; first += 32) {
        int64_t last = first + 32 < channels ? first + 32 : channels;
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *row = values + r * channels;
            for (int64_t c = first; c < last; c++) {
                uint32_t magnitude = row[c] & 0x7FFFu;
                int64_t j = c << 15 | magnitude;
                nan_count += magnitude > nan_floor;
                if (!++low[j])
                    wraps[written++] = (int32_t)j;
            }
        }
    }
    *nans = nan_count;
    return written;
}
/* The sketch's two passes over the scores such a table's bytes hold: the count n of (channel
   c, magnitude p) is the count of the score fl(magnitudes[p] * scales[c]). Cells go 64 at a
   time. Pass 1 skips blocks of zero counts, adds each n to its score's bucket, the sum of all
   to *total, and returns how many scores were NaN. Pass 2 adds each n at its score's low half
   in its bucket's slot, as count_low_halves, and returns the carries made; since a channel's
   scores rise with p (rounding is monotone and scales are >= 0), it skips, unread, every
   block whose first and last scores' buckets enclose no needed bucket (needed_below[b]: how
   many needed buckets lie below b), which is nearly every block. A block reaching the NaN
   patterns (or an infinite score) is never skipped. */
static inline uint32_t score_bits(float magnitude, float scale) {
    float score = magnitude * scale;
    uint32_t w;
    memcpy(&w, &score, sizeof w);
    return w;
}
static inline int zero_block(const uint8_t *cells) {
    uint64_t eight[8], any = 0;
    memcpy(eight, cells, sizeof eight);
    for (int i = 0; i < 8; i++)
        any |= eight[i];
    return !any;
}
static inline uint32_t bucket_of(const float *magnitudes, int64_t j, float scale) {
    return score_bits(magnitudes[j & 0x7FFF], scale) >> 16;
}
int64_t count_scaled_high(const uint8_t *restrict low, int64_t channels, const float *restrict magnitudes,
                          const float *restrict scales, int64_t *restrict counts, int64_t *restrict total) {
    int64_t nans = 0, seen = 0;
    for (int64_t block = 0; block < channels << 15; block += 64) {
        if (zero_block(low + block))
            continue;
        float scale = scales[block >> 15];
        for (int64_t group = block; group < block + 64; group += 8) {
            uint64_t eight;
            memcpy(&eight, low + group, sizeof eight);
            if (!eight)
                continue;
            uint32_t first = bucket_of(magnitudes, group, scale), last = bucket_of(magnitudes, group + 7, scale);
            if (first == last && last < 0x7F80u) {  /* one finite bucket: add the group's sum */
                uint32_t sum = 0;
                for (int i = 0; i < 8; i++)
                    sum += low[group + i];
                counts[first] += sum;
                seen += sum;
                continue;
            }
            for (int64_t j = group; j < group + 8; j++) {
                uint32_t n = low[j], w = score_bits(magnitudes[j & 0x7FFF], scale);
                counts[w >> 16] += n;
                nans += (w & 0x7FFFFFFFu) > 0x7F800000u ? n : 0;
                seen += n;
            }
        }
    }
    *total = seen;
    return nans;
}
/* Whether the buckets first..last (first <= last) enclose no needed bucket. */
static inline int unneeded(const uint32_t *needed_below, uint32_t first, uint32_t last) {
    return last < 0x7F80u && needed_below[last + 1] == needed_below[first];
}
int64_t count_scaled_low(const uint8_t *restrict low, int64_t channels, const float *restrict magnitudes,
                         const float *restrict scales, const uint32_t *restrict slot_of_bucket,
                         const uint32_t *restrict needed_below, uint16_t *restrict slot_low,
                         uint32_t *restrict slot_carry) {
    int64_t carries = 0;
    for (int64_t block = 0; block < channels << 15; block += 64) {
        float scale = scales[block >> 15];
        if (unneeded(needed_below, bucket_of(magnitudes, block, scale), bucket_of(magnitudes, block + 63, scale)))
            continue;
        for (int64_t group = block; group < block + 64; group += 8) {
            if (unneeded(needed_below, bucket_of(magnitudes, group, scale), bucket_of(magnitudes, group + 7, scale)))
                continue;
            for (int64_t j = group; j < group + 8; j++) {
                uint32_t n = low[j];
                if (!n)
                    continue;
                uint32_t w = score_bits(magnitudes[j & 0x7FFF], scale), slot = slot_of_bucket[w >> 16];
                if (slot) {
                    int64_t k = (int64_t)(slot - 1) << 16 | (w & 0xFFFF), sum = slot_low[k] + n;
                    slot_low[k] = (uint16_t)sum;
                    if (sum >> 16) {
                        slot_carry[k] += (uint32_t)(sum >> 16);
                        carries++;
                    }
                }
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
        lib.count_channel_magnitudes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p]
        lib.count_channel_magnitudes.restype = ctypes.c_int64
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        lib.count_scaled_high.argtypes = [pointer, size, pointer, pointer, pointer, pointer]
        lib.count_scaled_high.restype = size
        lib.count_scaled_low.argtypes = [pointer, size, pointer, pointer, pointer, pointer, pointer, pointer]
        lib.count_scaled_low.restype = size
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

    def add_pass1(self, chunk: Chunk, counts: np.ndarray | None = None) -> None:
        """Count a chunk's values by bucket (each ``counts[i]`` times, if given: int64 counts of a
        host chunk's values); NaN is refused since it has no rank."""
        if self._pass2 is not None:
            raise RuntimeError("add_pass1 after pass 2 started")
        if counts is not None:
            values = _float32_flat(chunk)
            if np.isnan(values[counts > 0]).any():
                raise ValueError("chunk contains NaN: quantiles of NaN are undefined")
            # float64 weights: exact while a bucket holds fewer than 2**53 values
            self._counts += np.bincount(_halves(values)[0], counts, _BUCKETS).astype(np.int64)
            return
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

    def add_pass2(self, chunk: Chunk, counts: np.ndarray | None = None) -> None:
        """Count the low 16 bits of a chunk's values that fall in a needed bucket (weighted by
        ``counts`` as in pass 1)."""
        pass2 = self._start_pass2()
        if _on_device(chunk) and counts is None:
            pass2.add_on_device(chunk)
        else:
            pass2.add(_float32_flat(chunk), counts)

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


def _zeroed(shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A zeroed array in a private anonymous mapping of its own, unmapped with the array.

    Why not ``np.zeros`` for the per-channel tables: they are large, live for a whole pass and
    are first touched in scattered order, and on the VMs measured (Firecracker guests) the first
    touch of a fresh malloc'd page is what costs: SmolLM2's 30 tables of 48 MiB took 2.9-4.3 s
    to fill from one block each that way, 0.6-0.7 s in such mappings. Private, not shared:
    shared anonymous memory is shmem, whose page faults cost more again (counting 30 layers of
    4,096 tokens 0.94 s against 1.13 s, reading the tables back 3.5 s against 3.9 s, one run
    each alternating). Small, short-lived counts (the sketch's pass 2) stay with ``np.zeros``,
    whose freed memory malloc hands out again warm.
    """
    count = int(np.prod(shape))
    memory = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(memory, dtype, count).reshape(shape)


class _SplitCounts:
    """Counts held as 16-bit rows plus 32-bit carry rows (count = low + 65536 * carry).

    Why: the fresh pages a count table faults in dominated a storeless CHESS fit (25 ns a value
    in 64-bit counts, not 6 warm); here only the 16-bit rows' pages are touched, the carry rows'
    only where a count passes 65,535 (zeroed memory is mapped untouched). ``carries`` counts
    those; while it is 0 the carry rows are never read.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.low, self.carry = np.zeros(shape, np.uint16), np.zeros(shape, np.uint32)
        self.carries = 0

    @property
    def nbytes(self) -> int:
        """The 16-bit rows' bytes: what a budget counts."""
        return self.low.nbytes

    def read(self) -> np.ndarray:
        """All counts, int64."""
        counts = self.low.astype(np.int64)
        if self.carries:
            counts += self.carry.astype(np.int64) << 16
        return counts

    def row(self, row: int) -> np.ndarray:
        """One row's counts: its 16-bit counts themselves while no count carried."""
        if not self.carries:
            return self.low[row]
        return self.low[row].astype(np.int64) + (self.carry[row].astype(np.int64) << 16)

    def row_sums(self) -> np.ndarray:
        seen = self.low.sum(axis=1, dtype=np.int64)
        if self.carries:
            seen += self.carry.sum(axis=1, dtype=np.int64) << 16
        return seen

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at the distinct flat positions ``keys``."""
        low, carry = self.low.reshape(-1), self.carry.reshape(-1)
        total = low[keys] + counts.astype(np.int64)
        low[keys] = total & 0xFFFF
        carried = total >> 16
        carry[keys] += carried.astype(np.uint32)
        self.carries += int(np.count_nonzero(carried))

    def add_dense(self, counts: np.ndarray) -> None:
        """Add a flat int64 array of counts of every position (a device's, another shard's)."""
        keys = np.flatnonzero(counts)
        self.add(keys, counts[keys])


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
        self._split = _SplitCounts((len(self.buckets), _BUCKETS))  # row: a needed bucket's low halves
        self._device_counts: torch.Tensor | None = None  # counts kept where the chunks lie
        self._total = 0

    @property
    def counts_bytes(self) -> int:
        return self._split.nbytes

    def add(self, values: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Count the low halves of ``values`` in needed buckets, each once or ``counts[i]`` times."""
        lib = native_library()
        if lib is not None and counts is None:
            values = np.ascontiguousarray(values)
            self._split.carries += lib.count_low_halves(
                values.ctypes.data, values.size, self._slot_of_bucket.ctypes.data,
                self._split.low.ctypes.data, self._split.carry.ctypes.data)
            self._total += values.size
            return
        high, low = _halves(values)
        slots = np.take(self._slot_of_bucket, high)
        hits = np.flatnonzero(slots)
        keys = (slots[hits].astype(np.intp) - 1) << 16 | low[hits]
        if counts is None:
            self._split.add(*np.unique(keys, return_counts=True))
            self._total += values.size
            return
        distinct, at = np.unique(keys, return_inverse=True)
        self._split.add(distinct, np.bincount(at, weights=counts[hits], minlength=len(distinct)).astype(np.int64))
        self._total += int(counts.sum())

    def add_on_device(self, chunk: torch.Tensor) -> None:
        """``add`` with PyTorch ops on the chunk's device, the counts staying there until read."""
        high, low = _device_halves(chunk)
        if self._device_counts is None:
            self._slot_table = torch.from_numpy(self._slot_of_bucket.astype(np.int64)).to(chunk.device)
            self._device_counts = torch.zeros(self._split.low.size, dtype=torch.int64, device=chunk.device)
        slots = self._slot_table[high]
        hits = slots > 0
        keys = (slots[hits] - 1) << 16 | low[hits]
        self._device_counts += torch.bincount(keys, minlength=self._device_counts.numel())
        self._total += chunk.numel()

    def _gather(self) -> None:
        """Fold the device's counts into the host's."""
        if self._device_counts is not None:
            self._split.add_dense(self._device_counts.cpu().numpy())
            self._device_counts = None

    def merge(self, other: _Pass2) -> None:
        self._gather()
        other._gather()
        self._split.add_dense(other._split.read().reshape(-1))
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
        counts = self._split.row(slot)
        ordered = counts[::-1] if negative else counts  # in value order
        # two levels (256 spans of 256), so no cumulative count of all 65,536 is made
        span_sums = ordered.reshape(256, 256).sum(axis=1, dtype=np.int64)
        span_ends = np.cumsum(span_sums)
        spans = span_ends.searchsorted(offsets, side="right")
        low = np.empty(len(offsets), dtype=np.int64)
        for span in np.unique(spans):
            at = spans == span
            within = offsets[at] - (span_ends[span] - span_sums[span])
            cumulative = np.cumsum(ordered[span << 8 : (span + 1) << 8], dtype=np.int64)
            low[at] = span << 8 | cumulative.searchsorted(within, side="right")
        return bucket << 16 | (_BUCKETS - 1 - low if negative else low)

    def _check_complete(self) -> None:
        """Pass 2 must have seen exactly pass 1's values, else the ranks point at wrong values."""
        seen = self._split.row_sums()
        if self._total != self.expected_total or not np.array_equal(seen, self._expected):
            raise ValueError(
                f"pass 2 saw {self._total} values ({seen.tolist()} in the needed buckets) where"
                f" pass 1 saw {self.expected_total} ({self._expected.tolist()}): feed the same"
                " values to both passes"
            )


class ChannelMagnitudeCounts:
    """Per channel, how often each magnitude of a 16-bit float (32,768 bit patterns, sign
    cleared) occurs in one (layer, component): enough for the exact quantiles of ``|x_c| * s_c``
    for per-channel scales ``s`` known only afterwards, so a scaled score (CHESS's ``|a| * m_c``,
    WINA's) needs one pass over the values, not the sketch's two.

    Why exact: within a channel the score is ``fl(|x| * s_c)`` of one of 32,768 magnitudes, so
    these counts give its exact distribution; ``quantiles`` weights each (channel, magnitude)
    score by its count.

    Layout: one byte a count, 32 KiB a channel (``bytes_for``; 48 MiB for a SmolLM2 layer, which
    is why a fit uses these only where all such keys fit its source's budget at once). The
    first touch of a fresh page dominated the counting, so the table is as narrow as it can be:
    a count past 255 wraps, and the C loop lists each wrap's cell (a few per thousand values
    where a channel's magnitudes crowd), kept beside the table as (cells, 256 each) and merged
    into one count per cell once more than ``WRAPS_HELD`` are listed, so they stay bounded by
    the crowded cells, not the values. Chunks on a GPU are counted there (``torch.bincount``,
    into 32-bit counts: four times the host table's bytes on the device) and the counts
    fetched once.
    """

    WRAPS_HELD = 1 << 20

    def __init__(self, channels: int, dtype: torch.dtype) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"per-channel magnitude counts need float16 or bfloat16 values, not {dtype}")
        self.channels, self.dtype = channels, dtype
        self._low = _zeroed((channels, PATTERNS), np.uint8)
        self._wrapped: list[tuple[np.ndarray, np.ndarray]] = []  # (cells, int64 counts) past the bytes
        self._wrapped_cells, self._merge_at = 0, self.WRAPS_HELD
        self._nan_floor = int(torch.tensor(float("inf"), dtype=dtype).view(torch.int16))  # inf's magnitude
        self._device_counts: torch.Tensor | None = None

    @staticmethod
    def bytes_for(channels: int) -> int:
        return channels * PATTERNS

    def add(self, chunk: torch.Tensor) -> None:
        """Count a [rows, channels] chunk of this dtype. NaN is refused: the error ends the fit
        (these counts are not to be used after it)."""
        if chunk.dtype != self.dtype or chunk.dim() != 2 or chunk.shape[1] != self.channels:
            raise ValueError(f"expected [rows, {self.channels}] {self.dtype} values, got "
                             f"{tuple(chunk.shape)} {chunk.dtype}")
        patterns = chunk.detach().contiguous().view(torch.int16)
        if _on_device(chunk):
            if chunk.isnan().any():
                raise ValueError("chunk contains NaN: quantiles of NaN are undefined")
            keys = torch.arange(self.channels, device=chunk.device) << 15 | (patterns.long() & 0x7FFF)
            if self._device_counts is None:
                # int32: a cell counts at most a shard's tokens; 4 bytes a cell on the device
                self._device_counts = torch.zeros(self._low.size, dtype=torch.int32, device=chunk.device)
            self._device_counts += torch.bincount(keys.reshape(-1), minlength=self._device_counts.numel())
            return
        words = patterns.numpy().view(np.uint16)
        lib = native_library()
        if lib is None:
            magnitudes = words & 0x7FFF
            nans = int(np.count_nonzero(magnitudes > self._nan_floor))
            self._add(*np.unique(np.arange(self.channels, dtype=np.intp) << 15 | magnitudes, return_counts=True))
        else:
            wraps = np.empty(words.size, np.int32)  # room for a wrap per value; pages are touched as written
            found = ctypes.c_int64()
            written = lib.count_channel_magnitudes(words.ctypes.data, len(words), self.channels, self._low.ctypes.data,
                                                   wraps.ctypes.data, self._nan_floor, ctypes.byref(found))
            nans = found.value
            if written:
                self._keep_wrapped(wraps[:written].astype(np.intp), np.full(written, 256, np.int64))
        if nans:
            raise ValueError("chunk contains NaN: quantiles of NaN are undefined")

    def _add(self, cells: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at the distinct flat ``cells``, what passes a byte kept beside."""
        low = self._low.reshape(-1)
        total = low[cells] + counts.astype(np.int64)
        low[cells] = total & 0xFF
        over = total >= 256
        self._keep_wrapped(cells[over], total[over] & ~0xFF)

    def _keep_wrapped(self, cells: np.ndarray, counts: np.ndarray) -> None:
        self._wrapped.append((cells, counts))
        self._wrapped_cells += len(cells)
        if self._wrapped_cells > self._merge_at:
            cells, at = np.unique(np.concatenate([c for c, _ in self._wrapped]), return_inverse=True)
            counts = np.bincount(at, np.concatenate([n for _, n in self._wrapped]), len(cells))  # exact below 2**53
            self._wrapped, self._wrapped_cells = [(cells, counts.astype(np.int64))], len(cells)
            self._merge_at = max(self.WRAPS_HELD, 2 * len(cells))  # many crowded cells: merge less often

    def quantiles(self, scales: np.ndarray, qs: Sequence[float]) -> np.ndarray:
        """Exact quantiles (one float64 per q) of ``fl(|x| * scales[c])`` in float32 over every
        value counted: what ``QuantileSketch`` gives fed those products."""
        if self._device_counts is not None:
            counts = self._device_counts.cpu().numpy().astype(np.int64)
            self._device_counts = None
            cells = np.flatnonzero(counts)
            self._add(cells, counts[cells])
        scales = np.asarray(scales, dtype=np.float32)
        if scales.shape != (self.channels,):
            raise ValueError(f"expected {self.channels} scales, got shape {scales.shape}")
        if not np.all(scales >= 0):  # the C pass 2 relies on scores rising with the magnitude
            raise ValueError("scales must be non-negative numbers")
        magnitudes = np.ascontiguousarray(pattern_magnitudes(self.dtype).numpy())

        def scores(cells: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore"):  # inf * 0 is NaN, which the sketch then refuses
                return magnitudes[cells & (PATTERNS - 1)] * scales[cells >> 15]

        wrapped = [np.concatenate(parts) for parts in zip(*self._wrapped)] if self._wrapped else None
        lib = native_library()
        if lib is None:
            cells = np.flatnonzero(self._low)
            counts = self._low.reshape(-1)[cells].astype(np.int64)
            if wrapped is not None:
                cells, counts = np.concatenate([cells, wrapped[0]]), np.concatenate([counts, wrapped[1]])
            return histogram_quantiles(scores(cells), counts, qs)
        sketch = QuantileSketch(qs)
        table = (self._low.ctypes.data, self.channels, magnitudes.ctypes.data, scales.ctypes.data)
        total = _table_pass1(lib, table, sketch)
        if wrapped is not None:
            sketch.add_pass1(scores(wrapped[0]), wrapped[1])
        _table_pass2(lib, table, sketch, total)
        if wrapped is not None:
            sketch.add_pass2(scores(wrapped[0]), wrapped[1])
        return sketch.result()


_Table = tuple[int, int, int, int]  # a byte table's address, its channels, the magnitudes' and scales' addresses


def _table_pass1(lib: ctypes.CDLL, table: _Table, sketch: QuantileSketch) -> int:
    """The sketch's pass 1 over the scores a ``ChannelMagnitudeCounts`` table counts (C); returns
    how many there are."""
    total = ctypes.c_int64()
    if lib.count_scaled_high(*table, sketch._counts.ctypes.data, ctypes.byref(total)):
        raise ValueError("a score is NaN (an infinite value in a channel scaled by 0)")
    return total.value


def _table_pass2(lib: ctypes.CDLL, table: _Table, sketch: QuantileSketch, total: int) -> None:
    """The sketch's pass 2 over the same scores (C), which skips the cells of buckets it does not need."""
    pass2 = sketch._start_pass2()
    needed_below = np.concatenate([[0], np.cumsum(pass2._slot_of_bucket > 0)]).astype(np.uint32)
    pass2._split.carries += lib.count_scaled_low(
        *table, pass2._slot_of_bucket.ctypes.data, needed_below.ctypes.data, pass2._split.low.ctypes.data,
        pass2._split.carry.ctypes.data)
    pass2._total += total  # the same table as pass 1's (the needed buckets' counts are still checked)


def histogram_quantiles(values: np.ndarray, counts: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """What ``QuantileSketch(qs)`` returns for a stream holding ``values[i]`` ``counts[i]`` times,
    from that histogram alone, so one pass over the data (which made it) is enough.

    ``values``: float32 values, repeated or not (a 16-bit float's magnitudes, say, or the scaled
    magnitudes of ``ChannelMagnitudeCounts``); those counted at least once must not be NaN.
    Both of the sketch's passes run over the histogram, weighted: time in its length, not in
    the values it counts.
    """
    values = np.asarray(values)
    counts = np.asarray(counts, dtype=np.int64)
    if values.dtype != np.float32 or values.shape != counts.shape or values.ndim != 1:
        raise ValueError("values must be 1-D float32, counts int64 of the same shape")
    sketch = QuantileSketch(qs)
    sketch.add_pass1(values, counts)
    sketch.add_pass2(values, counts)
    return sketch.result()


def exact_quantiles(chunks: Callable[[], Iterable[Chunk]], qs: Sequence[float]) -> np.ndarray:
    """Exact quantiles (one float64 per q) of every value ``chunks()`` yields; called twice."""
    sketch = QuantileSketch(qs)
    for chunk in chunks():
        sketch.add_pass1(chunk)
    for chunk in chunks():
        sketch.add_pass2(chunk)
    return sketch.result()
