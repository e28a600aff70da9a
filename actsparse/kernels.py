"""Sparse execution for decoding: skip the weights whose inputs a threshold zeroed, so a
sparsified model decodes faster, not only smaller. Thresholds on ``act`` (CATS, CHESS) skip the
up_proj rows and down_proj columns of zeroed channels (``SparseGatedMLP``); thresholds on a
projection's input (TEAL's seven, CHESS+'s q and o) skip the weight columns of zeroed inputs
(``SparseInputLinear``: ``y = b + sum over active c of x[c] * W[:, c]``, from a transposed copy).

For a gated FFN ``y = down(act(gate(x)) * up(x))`` with CATS/CHESS thresholds on ``a = act(g)``,
a zeroed channel ``c`` of ``a`` makes row ``c`` of up_proj and column ``c`` of down_proj useless.
One decoding step (one token) therefore computes the gate densely, masks ``a`` exactly as
``hooks.apply_thresholds`` does on ``act``, and runs up and down over the active channels only.

Paths, per call of a sparsified MLP or projection:

* prefill (more than one token): the dense masked computation; with batches of single tokens
  the active channels differ per row, so that is dense masked too.
* one token, active fraction <= ``break_even``: a sparse kernel.
* one token, active fraction above ``break_even``: the dense masked computation, which costs less
  then (the sparse path pays for finding the active channels and reads gathered rows less
  efficiently than a dense matvec streams them). Each kernel carries its own ``break_even``,
  measured by ``bench/bench_decode.py --sweep``; callers may override it.

Kernels (``KERNELS`` for gated FFNs, ``LINEAR_KERNELS`` for projections, both picked by name):
``native``, small C loops (``actsparse.native``) compiled on first use with the system C compiler
(float32, CPU), and ``torch``, PyTorch ops for any dtype and for machines without a compiler.
Each has a ``step`` (one token's selection and sparse product; the native one a single C call),
so a GPU (Triton) kernel plugs in as one more entry. None exists yet: on a GPU ``auto`` picks the
PyTorch kernel, its gathers as PyTorch launches them (``bench/bench_decode.py --device cuda``
times it against the dense model there).

The products a step keeps dense (a CATS/CHESS gate, projections no threshold feeds, the lm_head)
run on the same engine: with the native kernels a C matvec (``dense_product``, ``DenseLinear``),
which on an AMD EPYC VM streamed weights twice as fast as MKL's; the dense baseline of
``decode_speed``'s ``native_speedup`` is that matvec for every projection.

Measured (bench/RESULTS.md, 2-core x86-64, float32, 50% sparsity, native): FFN time 0.66x of
dense on a Llama-7B-shaped layer; whole SmolLM2-135M decoding steps 1.15-1.17x faster with CATS
or CHESS (its FFNs are ~40% of a step's time), 1.23x with CHESS+, 1.46x with TEAL.

Memory: both CPU kernels keep one extra copy of each down_proj weight, transposed so a channel's
column is a contiguous row: 1/3 of the FFN weights (+106 MB float32 for SmolLM2-135M, +2.9 GB
bfloat16 for a Llama-2-7B); a projection with a sparse input keeps its whole weight transposed
(TEAL: every projection, so the decoder layers' weights twice). The PyTorch kernel adds a
``CHUNK_BYTES`` scratch per layer. up_proj rows (and Phi-3's fused gate/up halves) are used in
place; weights are never modified.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import math
import mmap
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from actsparse import native
from actsparse.anatomy import Anatomy, anatomy_of, decoder_layers
from actsparse.hooks import INPUT_COMPONENTS, Key, hook_sites, _threshold, apply_thresholds

log = logging.getLogger(__name__)

# The PyTorch kernel gathers active up_proj rows in blocks of this size, so a block is still in
# cache for the matvec instead of making a second trip to memory.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class GatedWeights:
    """One gated FFN's projections as [channels, hidden] / [hidden, channels] tensors (views)."""

    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None

    @classmethod
    def of(cls, layer: nn.Module, anatomy: Anatomy) -> GatedWeights:
        down = layer.get_submodule(anatomy.down)
        if anatomy.gate_up:
            fused = layer.get_submodule(anatomy.gate_up)
            gate, up = fused.weight.chunk(2, dim=0)
            gate_bias, up_bias = fused.bias.chunk(2) if fused.bias is not None else (None, None)
        else:
            gate_proj, up_proj = layer.get_submodule(anatomy.gate), layer.get_submodule(anatomy.up)
            gate, gate_bias, up, up_bias = gate_proj.weight, gate_proj.bias, up_proj.weight, up_proj.bias
        return cls(gate, gate_bias, up, up_bias, down.weight, down.bias)


class Kernel(Protocol):
    """One token's FFN over its active channels; built once per layer."""

    break_even: float  # active fraction above which the dense computation is faster
    extra_bytes: int  # memory of the layouts it keeps beyond the model's weights
    dense: Callable[[torch.Tensor, torch.Tensor | None], Product]  # a weight's F.linear on its engine (the gate's)

    def step(self, x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, max_active: int) -> tuple[torch.Tensor | None, int]:
        """x [hidden], a = act(gate(x)) [channels] -> (``down(masked(a) * up(x))`` [hidden], or
        None when more than ``max_active`` channels stay nonzero after masking ``|a| < threshold``
        exactly as ``hooks.apply_thresholds`` does; and that count)."""
        ...


def _layout_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` for a kernel's layout; on the CPU in memory the OS is asked to back with
    transparent huge pages (Linux with THP in ``madvise`` or ``always`` mode; elsewhere ordinary
    pages). The kernels read scattered rows of a few KiB, each of which costs a TLB miss on 4 KiB
    pages. Measured on TEAL 0.5, Qwen2.5-1.5B, against the same kernels on ordinary pages in one
    run each: +2.4%, +3.6% and -0.4% decoding speed (CATS +0.3%); dense weights, read
    sequentially, gained nothing from them (bench/RESULTS.md). Private: shared anonymous memory is
    shmem, which THP leaves alone."""
    if t.device.type != "cpu":
        return t.clone(memory_format=torch.contiguous_format)
    memory = mmap.mmap(-1, max(1, t.numel() * t.element_size()), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel built without THP
            pass
    copy = torch.frombuffer(memory, dtype=t.dtype, count=t.numel()).view(t.shape)
    return copy.copy_(t)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _masked(a: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return a.masked_fill(a.abs() < threshold, 0)


Product = Callable[[torch.Tensor], torch.Tensor]  # x -> F.linear(x, weight, bias) of one projection


def torch_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """``F.linear`` of this weight: the PyTorch kernel's dense products."""
    return functools.partial(F.linear, weight=weight, bias=bias)


class TorchKernel:
    """PyTorch ops only, any dtype. up: active rows gathered block by block (``index_select`` into
    a reused scratch: no allocation, and the block is still in cache for the matvec). down:
    ``embedding_bag`` with the activations as per-sample weights sums the active rows of
    ``down.T`` in one fused pass."""

    # bench_decode.py --sweep --kernel torch, 2 threads: FFN time sparse/dense 0.96 and 0.90 at 40%
    # active (SmolLM2, 7B-shaped layer), 1.08 and 0.96 at 50%
    break_even = 0.4
    dense = staticmethod(torch_product)

    def __init__(self, weights: GatedWeights, chunk_bytes: int = CHUNK_BYTES) -> None:
        channels, hidden = weights.up.shape
        self.up, self.up_bias, self.down_bias = weights.up, weights.up_bias, weights.down_bias
        self.down_rows = _layout_of(weights.down.t())
        block = max(1, min(channels, chunk_bytes // (hidden * weights.up.element_size())))
        self.scratch = torch.empty(block, hidden, dtype=weights.up.dtype, device=weights.up.device)
        self.extra_bytes = _nbytes(self.down_rows, self.scratch)

    def select(self, a: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masked = _masked(a, threshold)
        index = masked.nonzero().view(-1)
        return masked[index], index

    def __call__(self, x: torch.Tensor, active: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        h = active * self._up(x, index)
        y = F.embedding_bag(index[None], self.down_rows, per_sample_weights=h[None], mode="sum")[0]
        return y if self.down_bias is None else y + self.down_bias

    def step(self, x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, max_active: int) -> tuple[torch.Tensor | None, int]:
        active, index = self.select(a, threshold)
        k = index.numel()
        return (self(x, active, index) if k <= max_active else None), k

    def _up(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty(index.numel(), dtype=x.dtype, device=x.device)
        block = self.scratch.shape[0]
        for start in range(0, index.numel(), block):
            part = index[start : start + block]
            rows = self.scratch[: part.numel()]
            torch.index_select(self.up, 0, part, out=rows)
            torch.mv(rows, x, out=out[start : start + part.numel()])
        return out if self.up_bias is None else out + self.up_bias[index]


# select_active replaces five PyTorch ops; the products read each active row once, 8 rows side by
# side (8 concurrent memory streams keep a memory-bound core busy; one row at a time reached ~2/3
# of a dense matvec's bandwidth), one from each eighth of the rows at hand (`member`), so each
# stream runs on through rows that follow each other in memory. PyTorch's gather-then-multiply
# reads each row, writes it and reads it again. bench_decode.py --sweep --kernel torch|native
# measures both.
# The work is split over the threads PyTorch uses, as the dense matvecs it replaces are (one core
# alone streamed a 1.5B model's rows slower than two, bench/RESULTS.md): the active rows in
# PARTS fixed parts, each summed into its own partial output, the partials then added in order,
# so the bits do not depend on the thread count. Each thread then streams whole rows, which on a
# 1.5B model's shapes beat splitting every row's output columns between threads by up to 15%, except
# for outputs wider than COLUMN_SPLIT_OUT, whose partials no longer stay in cache: those still
# split by columns. OpenMP: PyTorch has loaded its libgomp.so.1 by then, so the kernel joins the
# same thread pool instead of starting a second one.
PARTS = 16  # at least the threads a machine gives PyTorch, or the rest idle in the products
COLUMN_SPLIT_OUT = 2048
WIDE_OUTPUT = 16  # dense_product reads a weight with this many times more outputs than inputs transposed
NATIVE_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_ID 0
#define THREAD_COUNT 1
#endif
typedef float vec __attribute__((vector_size(32), aligned(4), may_alias)); /* 8 floats, any alignment */
#define ROWS 8 /* gathered rows read side by side */
#define COLUMNS 16 /* a thread's share of the output columns: whole cache lines of y */

static float hsum(vec v) {
    float s = 0;
    for (int l = 0; l < 8; l++) s += v[l];
    return s;
}

/* This thread's contiguous share [*lo, *hi) of [0, n), cut at multiples of unit: each element is
   then computed by the same instructions as by one thread, so the result does not depend on the
   thread count. */
static void share(int64_t n, int64_t unit, int64_t *lo, int64_t *hi) {
    int64_t units = (n + unit - 1) / unit, t = THREAD_ID, count = THREAD_COUNT;
    int64_t a = units * t / count * unit, b = units * (t + 1) / count * unit;
    *lo = a < n ? a : n;
    *hi = b < n ? b : n;
}

/* Entry q of group g when [lo, lo + groups * ROWS) is read ROWS entries side by side: with spread,
   one from each ROWS-th of the range, so each of the ROWS streams runs on through consecutive rows
   (~7% faster on a 1.5B model's dense step than ROWS adjacent rows, whose streams each stop after
   one row, bench/RESULTS.md); else ROWS consecutive entries. */
static inline int64_t member(int64_t lo, int64_t groups, int spread, int64_t g, int q) {
    return spread ? lo + g + q * groups : lo + g * ROWS + q;
}

/* y[r] = w[r] . x + bias[r] for the `rows` (at most ROWS) rows r[0..rows), read side by side; each
   row's sum the same instructions however many rows are read beside it */
static void dot_rows(const float *restrict w, const float *restrict bias, const float *restrict x, int64_t in,
                     const int64_t r[ROWS], int rows, float *restrict y) {
    vec acc[ROWS] = {{0}};
    int64_t j = 0;
    for (; j + 8 <= in; j += 8) {
        vec xj = *(const vec *)(x + j);
        for (int q = 0; q < rows; q++) acc[q] += *(const vec *)(w + r[q] * in + j) * xj;
    }
    for (int q = 0; q < rows; q++) {
        float sum = hsum(acc[q]);
        for (int64_t t = j; t < in; t++) sum += w[r[q] * in + t] * x[t];
        y[r[q]] = sum + (bias ? bias[r[q]] : 0);
    }
}

/* y = w x + bias (w: out rows of `in` floats, row-major, as nn.Linear keeps it), each thread a
   contiguous share of the rows cut at multiples of ROWS, read ROWS spread rows side by side. Each
   row's sum is the same instructions on any thread count. */
void dense_matvec(const float *restrict w, const float *restrict bias, const float *restrict x, int64_t out,
                  int64_t in, float *restrict y, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t lo, hi, r[ROWS];
        share(out, ROWS, &lo, &hi);
        int64_t groups = (hi - lo) / ROWS;
        for (int64_t g = 0; g < groups; g++) {
            for (int q = 0; q < ROWS; q++) r[q] = member(lo, groups, 1, g, q);
            dot_rows(w, bias, x, in, r, ROWS, y);
        }
        int rest = (int)(hi - lo - ROWS * groups);
        for (int q = 0; q < rest; q++) r[q] = lo + ROWS * groups + q;
        dot_rows(w, bias, x, in, r, rest, y);
    }
}

/* The channels c whose a[c] is nonzero and not below t[c * t_step] (NaN stays, as in the mask):
   their indices and values, compacted; returns how many. Branch-free (every channel written at
   slot k, k advanced only past kept ones): at half activity a branch per channel mispredicts
   every other time, ~1 ms of a 1.5B TEAL step (bench/RESULTS.md). */
int64_t select_active(const float *restrict a, const float *restrict t, int64_t t_step, int64_t n,
                      int64_t *restrict index, float *restrict active) {
    int64_t k = 0;
    for (int64_t c = 0; c < n; c++) {
        float v = a[c];
        index[k] = c;
        active[k] = v;
        k += !(fabsf(v) < t[c * t_step]) & (v != 0);
    }
    return k;
}

/* Part p of `parts` of [0, k), cut at multiples of ROWS from k and parts alone (not the thread
   count), so each part, and the sum of the parts' partial outputs in part order, comes out the
   same on any number of threads. */
static void part_of(int64_t k, int64_t p, int64_t parts, int64_t *lo, int64_t *hi) {
    int64_t units = (k + ROWS - 1) / ROWS, a = units * p / parts * ROWS, b = units * (p + 1) / parts * ROWS;
    *lo = a < k ? a : k;
    *hi = b < k ? b : k;
}

/* y = bias + the parts' partial outputs, summed in part order, on this thread's share of y */
static void sum_parts(const float *restrict partials, int64_t parts, const float *restrict bias, int64_t out,
                      float *restrict y) {
    int64_t lo, hi;
    share(out, COLUMNS, &lo, &hi);
    for (int64_t j = lo; j < hi; j++) {
        float sum = bias ? bias[j] : 0;
        for (int64_t p = 0; p < parts; p++) sum += partials[p * out + j];
        y[j] = sum;
    }
}

/* y[c0:c1] += sum_q h[q] * row[q][c0:c1], the ROWS rows read side by side */
static void axpy_block(const float *const row[ROWS], const float *restrict h, int64_t c0, int64_t c1,
                       float *restrict y) {
    int64_t j = c0;
    for (; j + 8 <= c1; j += 8) {
        vec acc = *(const vec *)(y + j);
        for (int q = 0; q < ROWS; q++) acc += h[q] * *(const vec *)(row[q] + j);
        *(vec *)(y + j) = acc;
    }
    for (; j < c1; j++)
        for (int q = 0; q < ROWS; q++) y[j] += h[q] * row[q][j];
}

/* y[c0:c1] += sum over i in [lo, hi) of h[i] * w[index[i]][c0:c1] (w: rows of `out` floats; no
   index: row i), ROWS rows side by side, spread or consecutive (`member`) */
static void axpy_rows(const float *restrict w, int64_t out, const int64_t *restrict index, int64_t lo, int64_t hi,
                      const float *restrict h, int64_t c0, int64_t c1, int spread, float *restrict y) {
    int64_t groups = (hi - lo) / ROWS;
    for (int64_t g = 0; g < groups; g++) {
        const float *row[ROWS];
        float hg[ROWS];
        for (int q = 0; q < ROWS; q++) {
            int64_t i = member(lo, groups, spread, g, q);
            row[q] = w + (index ? index[i] : i) * out;
            hg[q] = h[i];
        }
        axpy_block(row, hg, c0, c1, y);
    }
    for (int64_t i = lo + groups * ROWS; i < hi; i++) {
        const float *row = w + (index ? index[i] : i) * out;
        for (int64_t j = c0; j < c1; j++) y[j] += h[i] * row[j];
    }
}

/* y = sum over active i in [lo, hi) of h_i * down_i, where h_i = active[i] * (up_i . x + up_bias)
   and block c = [up row c | down column c] (2 * hidden floats, contiguous: each active channel
   is one sequential read, ~7% faster than two arrays on a 1.5B model's FFN) */
static void block_pass(const float *restrict blocks, const float *restrict up_bias, const int64_t *restrict index,
                       int64_t lo, int64_t hi, const float *restrict x, int64_t hidden, const float *restrict active,
                       float *restrict y) {
    memset(y, 0, hidden * sizeof(float));
    int64_t groups = (hi - lo) / ROWS;
    for (int64_t g = 0; g < groups; g++) {
        const float *row[ROWS];
        vec acc[ROWS] = {{0}};
        float h[ROWS];
        int64_t at[ROWS];
        for (int q = 0; q < ROWS; q++) {
            at[q] = member(lo, groups, 1, g, q);
            row[q] = blocks + index[at[q]] * 2 * hidden;
        }
        int64_t j = 0;
        for (; j + 8 <= hidden; j += 8) {
            vec xj = *(const vec *)(x + j);
            for (int q = 0; q < ROWS; q++) acc[q] += *(const vec *)(row[q] + j) * xj;
        }
        for (int q = 0; q < ROWS; q++) {
            float sum = hsum(acc[q]) + (up_bias ? up_bias[index[at[q]]] : 0);
            for (int64_t t = j; t < hidden; t++) sum += row[q][t] * x[t];
            h[q] = active[at[q]] * sum;
            row[q] += hidden; /* its down column */
        }
        axpy_block(row, h, 0, hidden, y);
    }
    for (int64_t i = lo + groups * ROWS; i < hi; i++) {
        const float *row = blocks + index[i] * 2 * hidden;
        float sum = up_bias ? up_bias[index[i]] : 0;
        for (int64_t t = 0; t < hidden; t++) sum += row[t] * x[t];
        float h = active[i] * sum;
        for (int64_t t = 0; t < hidden; t++) y[t] += h * row[hidden + t];
    }
}

/* y = w x + bias from the weight transposed (w_rows: `in` rows of `out` floats), each thread a
   share of the output columns over every row: for outputs many times wider than the input (an
   lm_head), which stream faster so than as dot products (bench/RESULTS.md). Each output's sum is
   the same instructions on any thread count. */
void dense_matvec_rows(const float *restrict w_rows, const float *restrict bias, const float *restrict x, int64_t in,
                       int64_t out, float *restrict y, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t lo, hi;
        share(out, COLUMNS, &lo, &hi);
        if (bias) memcpy(y + lo, bias + lo, (hi - lo) * sizeof(float)); else memset(y + lo, 0, (hi - lo) * sizeof(float));
        axpy_rows(w_rows, out, NULL, 0, in, x, lo, hi, 0, y);
    }
}

/* One token's FFN in one call: select_active, then, if at most max_active channels are active,
   y = down(a * up(x)) over them: the parts (partials: parts x hidden floats) shared out over up
   to `threads` threads, then summed. Returns the active count (y untouched when above max_active). */
int64_t sparse_ffn(const float *restrict a, const float *restrict t, int64_t t_step, int64_t n, int64_t max_active,
                   const float *restrict blocks, const float *restrict up_bias, const float *restrict down_bias,
                   const float *restrict x, int64_t hidden, int64_t *restrict index, float *restrict active,
                   int64_t parts, float *restrict partials, float *restrict y, int threads) {
    int64_t k = select_active(a, t, t_step, n, index, active);
    if (k > max_active) return k;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < parts; p++) {
            int64_t lo, hi;
            part_of(k, p, parts, &lo, &hi);
            block_pass(blocks, up_bias, index, lo, hi, x, hidden, active, partials + p * hidden);
        }
        sum_parts(partials, parts, down_bias, hidden, y);
    }
    return k;
}

/* One token through a projection whose input x is thresholded: y = bias + sum over the active
   inputs c of x[c] * w_rows[c] (w_rows: the weight transposed), on up to `threads` threads: by
   parts as sparse_ffn, or, with parts = 0, by output columns. Returns the active count (y
   untouched when above max_active). */
int64_t sparse_linear(const float *restrict x, const float *restrict t, int64_t t_step, int64_t n, int64_t max_active,
                      const float *restrict w_rows, const float *restrict bias, int64_t out,
                      int64_t *restrict index, float *restrict active, int64_t parts, float *restrict partials,
                      float *restrict y, int threads) {
    int64_t k = select_active(x, t, t_step, n, index, active);
    if (k > max_active) return k;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        if (parts == 0) {
            int64_t lo, hi;
            share(out, COLUMNS, &lo, &hi);
            if (bias) memcpy(y + lo, bias + lo, (hi - lo) * sizeof(float)); else memset(y + lo, 0, (hi - lo) * sizeof(float));
            /* adjacent rows: spread ones read these wide column shares slower (bench/RESULTS.md) */
            axpy_rows(w_rows, out, index, 0, k, active, lo, hi, 0, y);
        } else {
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < parts; p++) {
                int64_t lo, hi;
                float *partial = partials + p * out;
                part_of(k, p, parts, &lo, &hi);
                memset(partial, 0, out * sizeof(float));
                axpy_rows(w_rows, out, index, lo, hi, active, 0, out, 1, partial);
            }
            sum_parts(partials, parts, bias, out, y);
        }
    }
    return k;
}
"""


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The C loops compiled for this machine; None when no compiler works, so decoding falls back
    to ``TorchKernel``."""
    lib = native.load("sparse decode kernel", NATIVE_SOURCE, ("-fopenmp",)) or native.load(
        "sparse decode kernel", NATIVE_SOURCE)  # without OpenMP: one thread
    if lib is None:
        return None
    pointer, size, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sparse_ffn.argtypes = [pointer, pointer, size, size, size, *[pointer] * 4, size, pointer, pointer, size, pointer, pointer, count]
    lib.sparse_linear.argtypes = [pointer, pointer, size, size, size, pointer, pointer, size, pointer, pointer, size, pointer, pointer, count]
    lib.sparse_ffn.restype = lib.sparse_linear.restype = size
    lib.dense_matvec.argtypes = lib.dense_matvec_rows.argtypes = [pointer, pointer, pointer, size, size, pointer, count]
    return lib


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def dense_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """``x -> F.linear(x, weight, bias)``, one float32 token on the CPU through the C
    ``dense_matvec`` (anything else through ``F.linear``). Why: a BLAS matvec can stream weights
    at half the kernels' rate (MKL on an AMD EPYC VM: 17-24 GB/s against 37-48, bench/RESULTS.md),
    and the dense products of a sparse step (a CATS gate, the projections no threshold feeds, the
    lm_head) and the dense baseline it is compared with must run on the same code as the kernels,
    or the speedup measures the BLAS, not sparsity. The weight is checked once here, not per
    token (~4 us of Python a call, ~200 calls a step).

    An output at least ``WIDE_OUTPUT`` times wider than its input (an lm_head) is read from a
    transposed copy instead (``dense_matvec_rows``, in huge pages): 12-15% faster on 1 and 2
    threads for SmolLM2's and Qwen2.5-1.5B's lm_heads, ~2.4 ms of a 1.5B step on every side
    (bench/RESULTS.md), for one more copy of that weight (~0.9 GB there) while it lives."""
    lib = native_library()
    native = lib is not None and weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu" and (
        weight.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))
    if not native:
        return torch_product(weight, bias)
    out, inputs = weight.shape
    if out >= WIDE_OUTPUT * inputs:
        read, layout = lib.dense_matvec_rows, _layout_of(weight.t())
        sizes = inputs, out
    else:
        read, layout, sizes = lib.dense_matvec, weight, (out, inputs)

    def product(x: torch.Tensor) -> torch.Tensor:
        if x.numel() != inputs or x.shape[-1] != inputs or x.dtype != torch.float32:  # not one float32 token
            return F.linear(x, weight, bias)
        x, y = x.contiguous(), torch.empty(out)
        read(layout.data_ptr(), _pointer(bias), x.data_ptr(), *sizes, y.data_ptr(), torch.get_num_threads())
        return y.view(*x.shape[:-1], out)

    return product


class NativeKernel:
    """The C loops of ``native_library``: float32 on CPU, on PyTorch's thread count."""

    # bench_decode.py --sweep, 2 threads: FFN time sparse/dense 0.97 and 0.84 at 80% active
    # (SmolLM2, 7B-shaped layer), 0.98 and 0.91 at 90%, 1.01 and 0.94 at 100%
    break_even = 0.8
    dense = staticmethod(dense_product)

    def __init__(self, weights: GatedWeights) -> None:
        self.lib = native_library()
        up = weights.up
        if self.lib is None or up.dtype != torch.float32 or up.device.type != "cpu":
            raise ValueError(f"the native kernel needs a C compiler and float32 on CPU, got {up.dtype} on {up.device}")
        self.up_bias, self.down_bias = weights.up_bias, weights.down_bias
        self.blocks = _layout_of(torch.cat([up, weights.down.t()], dim=1))  # channel c: [up row | down column]
        self.extra_bytes = _nbytes(self.blocks)
        channels, hidden = up.shape  # step's scratch, reused: the active channels, their values, the partial outputs
        self._index, self._active = torch.empty(channels, dtype=torch.int64), torch.empty(channels)
        self._partials = torch.empty(PARTS, hidden)

    def step(self, x: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, max_active: int) -> tuple[torch.Tensor | None, int]:
        """One C call (select, then each active channel's up row and down column in one read) on
        reused scratch: as separate calls with their PyTorch glue they cost ~5% more of a SmolLM2
        decoding step. The C code reads the rows of the channels it selected itself, so no index
        from outside reaches it."""
        n, hidden = a.numel(), self._partials.shape[1]
        if a.dtype != torch.float32 or x.dtype != torch.float32 or threshold.dtype != torch.float32 or threshold.numel() not in (1, n):
            got = f"{x.dtype}, {a.dtype} [{n}], threshold {threshold.dtype} [{threshold.numel()}]"
            raise TypeError(f"the native kernel takes float32 x, activations and threshold (scalar or per channel), got {got}")
        a, x, threshold = a.contiguous(), x.contiguous(), threshold.contiguous()
        y = torch.empty(hidden)
        k = self.lib.sparse_ffn(
            a.data_ptr(), threshold.data_ptr(), 0 if threshold.numel() == 1 else 1, n, max_active,
            self.blocks.data_ptr(), _pointer(self.up_bias), _pointer(self.down_bias), x.data_ptr(), hidden,
            self._index.data_ptr(), self._active.data_ptr(), PARTS, self._partials.data_ptr(), y.data_ptr(),
            torch.get_num_threads(),
        )
        return (y if k <= max_active else None), k


class TorchLinearKernel:
    """A projection with a thresholded input, in PyTorch ops: ``embedding_bag`` sums the rows of
    the transposed weight that the active inputs pick, weighted by them."""

    break_even = TorchKernel.break_even  # the same gather as TorchKernel's down_proj
    select = TorchKernel.select

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.rows, self.bias = _layout_of(weight.t()), bias
        self.extra_bytes = _nbytes(self.rows)

    def step(self, x: torch.Tensor, threshold: torch.Tensor, max_active: int) -> tuple[torch.Tensor | None, int]:
        """x [in] -> (``W @ masked(x) + b`` [out], or None above ``max_active`` active inputs; their count)."""
        active, index = self.select(x, threshold)
        if index.numel() > max_active:
            return None, index.numel()
        y = F.embedding_bag(index[None], self.rows, per_sample_weights=active[None], mode="sum")[0]
        return (y if self.bias is None else y + self.bias), index.numel()


class NativeLinearKernel:
    """A projection with a thresholded input in one C call (``sparse_linear``): float32 on CPU."""

    break_even = NativeKernel.break_even  # the same gather as NativeKernel's down_proj

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.lib = native_library()
        if self.lib is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"the native kernel needs a C compiler and float32 on CPU, got {weight.dtype} on {weight.device}")
        self.rows, self.bias = _layout_of(weight.t()), bias
        self.extra_bytes = _nbytes(self.rows)
        out, inputs = weight.shape
        self._index, self._active = torch.empty(inputs, dtype=torch.int64), torch.empty(inputs)
        self._parts = PARTS if out <= COLUMN_SPLIT_OUT else 0  # 0: split by output columns
        self._partials = torch.empty(self._parts, out)

    def step(self, x: torch.Tensor, threshold: torch.Tensor, max_active: int) -> tuple[torch.Tensor | None, int]:
        n, out = x.numel(), self.rows.shape[1]
        if x.dtype != torch.float32 or threshold.dtype != torch.float32 or threshold.numel() not in (1, n):
            got = f"{x.dtype} [{n}], threshold {threshold.dtype} [{threshold.numel()}]"
            raise TypeError(f"the native kernel takes float32 input and threshold (scalar or per input), got {got}")
        x, threshold = x.contiguous(), threshold.contiguous()
        y = torch.empty(out)
        k = self.lib.sparse_linear(
            x.data_ptr(), threshold.data_ptr(), 0 if threshold.numel() == 1 else 1, n, max_active,
            self.rows.data_ptr(), _pointer(self.bias), out, self._index.data_ptr(), self._active.data_ptr(),
            self._parts, self._partials.data_ptr(), y.data_ptr(), torch.get_num_threads(),
        )
        return (y if k <= max_active else None), k


def _kernel_name(weight: torch.Tensor, name: str) -> str:
    """``auto``: the native kernel where it applies (CPU, float32, a C compiler), else PyTorch's,
    which runs on any device. A GPU kernel (Triton) would be one more name here, and ``auto``'s
    pick on its device."""
    if name == "auto":
        native = weight.device.type == "cpu" and weight.dtype == torch.float32 and native_library() is not None
        return "native" if native else "torch"
    if name not in KERNELS:
        raise ValueError(f"unknown sparse decode kernel {name!r}; choose auto or one of {sorted(KERNELS)}")
    return name


def make_kernel(weights: GatedWeights, name: str = "auto") -> Kernel:
    """The gated-FFN kernel ``name`` (see ``_kernel_name``) over one layer's weights."""
    return KERNELS[_kernel_name(weights.up, name)](weights)


def make_linear_kernel(weight: torch.Tensor, bias: torch.Tensor | None, name: str = "auto"):
    """The thresholded-input kernel ``name`` (see ``_kernel_name``) of one projection."""
    return LINEAR_KERNELS[_kernel_name(weight, name)](weight, bias)


KERNELS: dict[str, Callable[[GatedWeights], Kernel]] = {"torch": TorchKernel, "native": NativeKernel}
LINEAR_KERNELS = {"torch": TorchLinearKernel, "native": NativeLinearKernel}


@dataclass(slots=True)
class StepTally:
    """What one sparse module's calls did: how many took each path (``prefill``, ``sparse``,
    ``fallback``) and the active channels summed over its single-token steps. A plain object, not
    attributes of the ``nn.Module``: setting a module attribute goes through
    ``nn.Module.__setattr__``: a TEAL projection call's Python took 14.0 us with them, 11.9 us without."""

    paths: Counter[str] = field(default_factory=Counter)
    active_channels: int = 0

    @property
    def single_token_steps(self) -> int:
        return self.paths["sparse"] + self.paths["fallback"]


class SparseGatedMLP(nn.Module):
    """Stands in for one decoder layer's gated MLP while a model is sparsified for decoding.

    It registers the original MLP's children under their own names, so ``state_dict`` keys do not
    change. Hooks on the projections do not fire (their weights are read directly); a hook on the
    activation module does.
    """

    def __init__(
        self,
        original: nn.Module,
        weights: GatedWeights,
        act: nn.Module,
        threshold: torch.Tensor,
        break_even: float | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.original = [original]  # a list, so it is not registered a second time
        self.weights = weights
        self.act = act
        self.threshold = threshold
        self.kernel = make_kernel(weights, kernel)
        self.break_even = self.kernel.break_even if break_even is None else break_even
        self.max_active = math.floor(self.break_even * weights.up.shape[0])  # the sparse path's limit
        self.channels = weights.up.shape[0]  # width of the thresholded vector
        self.tally = StepTally()
        self.gate_product = self.kernel.dense(weights.gate, weights.gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.gate_product(x))
        tally = self.tally
        if x.shape[:-1].numel() == 1:
            y, active = self.kernel.step(x.view(-1), a.view(-1), self.threshold, self.max_active)
            tally.active_channels += active
            if y is not None:
                tally.paths["sparse"] += 1
                return y.view_as(x)
            tally.paths["fallback"] += 1
        else:
            tally.paths["prefill"] += 1
        return self.masked_dense(x, a)

    def masked_dense(self, x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """The dense masked MLP, as ``hooks.apply_thresholds`` computes it (``a = act(gate(x))``),
        the gate on the kernel's dense product as in ``forward``: the same ``a`` to threshold, so a
        value within rounding of its threshold cannot be kept here and zeroed there."""
        w = self.weights
        a = self.act(self.gate_product(x)) if a is None else a
        return F.linear(_masked(a, self.threshold) * F.linear(x, w.up, w.up_bias), w.down, w.down_bias)

    @property
    def skippable_params(self) -> int:
        """Weights a zeroed channel lets a step skip: its up_proj row and down_proj column."""
        return self.weights.up.numel() + self.weights.down.numel()


class SharedInput:
    """The projections one thresholded input feeds (q, k and v on ``attn_in``, gate and up on
    ``ffn_in``) as one kernel over their weights stacked: one selection and one C call instead of
    one per projection (each ~14 us beyond a dense call's, 196 calls a TEAL step on a 1.5B model),
    and each active input's row of all of them read in one stretch. The first member called with
    an input computes every member's output; the others take theirs for that same input (the
    tensor object: the model calls them one after another on it, and inference tensors keep no
    version counter that could tell an in-place change)."""

    def __init__(self, linears: Sequence[nn.Linear], kernel: str) -> None:
        weight = torch.cat([linear.weight for linear in linears])
        biases = [linear.bias for linear in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [weight.new_zeros(linear.out_features) if b is None else b for linear, b in zip(linears, biases)])
        self.kernel = make_linear_kernel(weight, bias, kernel)
        ends = [0, *itertools.accumulate(linear.out_features for linear in linears)]
        self.slices = [slice(start, end) for start, end in zip(ends, ends[1:])]
        self._computed: tuple[torch.Tensor, torch.Tensor | None, int] | None = None  # input, y, k
        self._waiting = 0  # bit m set: member m has not taken its output of it
        self._everyone = (1 << len(self.slices)) - 1

    def step(self, member: int, x: torch.Tensor, threshold: torch.Tensor, max_active: int) -> tuple[torch.Tensor | None, int]:
        """Member ``member``'s ``(output or None above max_active, active count)`` for one token's
        input ``x`` (the module's input tensor, whose identity says whether it was computed)."""
        computed, bit = self._computed, 1 << member
        if computed is None or computed[0] is not x or not self._waiting & bit:
            computed = self._computed = (x, *self.kernel.step(x.view(-1), threshold, max_active))
            self._waiting = self._everyone
        self._waiting &= ~bit
        if not self._waiting:
            self._computed = None  # holds no tensor beyond the step
        _, y, k = computed
        return (None if y is None else y[self.slices[member]]), k


class SparseInputLinear(nn.Module):
    """Stands in for a projection whose input a threshold sparsifies (TEAL's seven, CHESS+'s q and
    o): one token's output sums the transposed weight's rows of the active inputs only, computed
    with the other projections of the same input (``SharedInput``). It holds the original's weight
    and bias under their own names, so ``state_dict`` keys do not change."""

    def __init__(self, original: nn.Linear, threshold: torch.Tensor, shared: SharedInput, member: int,
                 break_even: float | None = None) -> None:
        super().__init__()
        self.original = [original]  # a list, so it is not registered a second time
        self.weight, self.bias = original.weight, original.bias
        self.threshold = threshold
        self.shared, self.member = shared, member
        self.kernel = shared.kernel
        self.break_even = self.kernel.break_even if break_even is None else break_even
        self.channels = original.in_features
        self.max_active = math.floor(self.break_even * self.channels)
        self.tally = StepTally()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tally = self.tally
        if x.shape[:-1].numel() == 1:
            y, active = self.shared.step(self.member, x, self.threshold, self.max_active)
            tally.active_channels += active
            if y is not None:
                tally.paths["sparse"] += 1
                return y.view(*x.shape[:-1], -1)
            tally.paths["fallback"] += 1
        else:
            tally.paths["prefill"] += 1
        return self.masked_dense(x)

    def masked_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The dense projection of the masked input, as ``hooks.apply_thresholds`` computes it."""
        return F.linear(_masked(x, self.threshold), self.weight, self.bias)

    @property
    def skippable_params(self) -> int:
        """Weights a zeroed input lets a step skip: its column of the weight."""
        return self.weight.numel()


SparseModule = SparseGatedMLP | SparseInputLinear


class DenseLinear(nn.Module):
    """Stands in for an ``nn.Linear`` of a model sparsified for decoding with the native kernels:
    the same weight and bias (``state_dict`` keys do not change), its products through
    ``dense_product``, so the projections no threshold feeds and the lm_head run on the same code
    as the kernels, in the sparse steps and in ``decode_speed``'s dense step of that engine."""

    def __init__(self, original: nn.Linear) -> None:
        super().__init__()
        self.original = [original]  # a list, so it is not registered a second time
        self.weight, self.bias = original.weight, original.bias
        self.in_features, self.out_features = original.in_features, original.out_features
        self.product = dense_product(original.weight, original.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


Slot = tuple[nn.Module, str, nn.Module]  # (parent, child name, the module put there)


class SparseDecode:
    """The modules one ``sparsify_for_decode`` call replaced; ``remove()`` (or leaving the ``with``
    block) puts the original module objects back, ``attach()`` the sparse ones (and the dense
    stand-ins of every other linear) again without rebuilding their layouts, ``attach_dense()``
    the dense stand-ins alone. Counts stay readable after removal."""

    def __init__(self, replaced: list[Slot], dense_stand_ins: list[Slot]) -> None:
        self._replaced, self._dense = replaced, dense_stand_ins
        self.modules = [sparse for _, _, sparse in replaced]
        # per module: (threshold, max_active, tally) of the sparse steps, and of steps keeping every channel
        self._settings = {
            False: [(m.threshold, m.max_active, m.tally) for m in self.modules],
            True: [(torch.zeros((), dtype=m.threshold.dtype), m.channels, StepTally()) for m in self.modules],
        }

    def keep_every_channel(self, keep: bool) -> None:
        """``True``: thresholds of 0 (only exact zeros are skipped) and no dense fallback, so the
        single-token steps run the kernels over every channel, counted apart from the sparse
        steps; ``False``: the sparse setting back. Kernels at full activity are a dense baseline
        that reads the weights as the sparse steps do (``decode_speed``'s ``kernel_dense_tps``)."""
        for module, (threshold, max_active, tally) in zip(self.modules, self._settings[keep]):
            module.threshold, module.max_active, module.tally = threshold, max_active, tally

    def attach(self) -> None:
        for parent, name, module in [*self._dense, *self._replaced]:  # a sparse module wins its slot
            setattr(parent, name, module)

    def attach_dense(self) -> None:
        """Nothing skipped, every linear of the model on the kernels' dense product (``DenseLinear``;
        with the PyTorch kernel, PyTorch's own): the dense step of the engine the sparse steps run
        on (``decode_speed``'s ``native_dense_tps``)."""
        self.remove()
        for parent, name, stand_in in self._dense:
            setattr(parent, name, stand_in)

    def paths(self) -> Counter[str]:
        """How many sparsified module calls took each path: ``prefill``, ``sparse``, ``fallback``."""
        return sum((m.tally.paths for m in self.modules), Counter())

    def active_fraction(self) -> float:
        """Mean fraction of active channels over all single-token steps of all sparsified modules."""
        seen = sum(m.tally.single_token_steps * m.channels for m in self.modules)
        return sum(m.tally.active_channels for m in self.modules) / seen if seen else float("nan")

    def active_fractions(self) -> list[float]:
        """Each module's (``modules`` order) fraction of active channels over its single-token steps."""
        return [m.tally.active_channels / (steps * m.channels) if (steps := m.tally.single_token_steps) else float("nan")
                for m in self.modules]

    def extra_bytes(self) -> int:
        """Memory the kernels' layouts hold beyond the model's own weights (a shared kernel once)."""
        return sum(kernel.extra_bytes for kernel in {id(m.kernel): m.kernel for m in self.modules}.values())

    def remove(self) -> None:
        for parent, name, module in [*self._replaced, *self._dense]:
            setattr(parent, name, module.original[0])

    def __enter__(self) -> SparseDecode:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def sparsify_for_decode(
    model: nn.Module,
    thresholds: Mapping[Key, torch.Tensor | float],
    break_even: float | None = None,
    kernel: str = "auto",
    kv_dense: bool = False,
) -> SparseDecode:
    """Replace what each threshold sparsifies by a module that skips the work it zeroes:

    * ``(layer, "act")`` (scalar for CATS, per-channel for CHESS): the layer's gated MLP by a
      ``SparseGatedMLP``;
    * an input component (``ffn_in``, ``h``, ``attn_in``, ``o_in``; TEAL, CHESS+): every projection
      it feeds (as ``hooks.apply_thresholds`` masks them, ``kv_dense`` keeping k and v dense) by a
      ``SparseInputLinear``.

    With the native kernels every other ``nn.Linear`` (the lm_head included) runs through
    ``dense_product`` (``DenseLinear``), so a step's dense products run on the same code as its
    sparse ones; other modules stay untouched. ``break_even``: the active fraction above which a
    step runs dense (default: the kernel's own); ``kernel``: ``auto`` or a name in ``KERNELS``.

    The outputs equal those of ``hooks.apply_thresholds(model, thresholds, kv_dense=kv_dense)`` up
    to float rounding (a sparse sum adds in another order). Build it after moving the model to its
    device and dtype: the kernels' layouts are copies made here.
    """
    anatomy = anatomy_of(model)
    components = {component for _, component in thresholds}
    unsupported = sorted(components - {"act", *INPUT_COMPONENTS})
    if unsupported:
        raise ValueError(f"sparse decoding thresholds act and {', '.join(INPUT_COMPONENTS)}, got {unsupported}")
    if "act" in components and not anatomy.gated:
        raise ValueError(f"{anatomy.family} has no gated FFN; skipping channels of act needs gate, act and up")
    if break_even is not None and not 0 <= break_even <= 1:
        raise ValueError(f"break_even is a fraction of channels in [0, 1], got {break_even}")
    layers = decoder_layers(model, anatomy)
    bad = sorted(index for index, _ in thresholds if not 0 <= index < len(layers))
    if bad:
        raise ValueError(f"layer indices {bad} out of range; the model has {len(layers)} decoder layers")
    both = sorted(i for i, c in thresholds if c == "act" and {(i, "ffn_in"), (i, "h")} & thresholds.keys())
    if both:
        raise ValueError(f"layers {both} threshold act and an FFN input; sparse decoding takes one or the other")
    replaced = []  # all built before any is swapped in, so bad input leaves the model as it was
    for (index, component), value in sorted(thresholds.items()):
        layer = layers[index]
        if component == "act":
            replaced.append(_sparse_mlp(layer, anatomy, value, index, break_even, kernel))
        else:
            paths = [site.path for site in hook_sites(anatomy, component, kv_dense)]
            replaced += _sparse_linears(layer, paths, value, (index, component), break_even, kernel)
    handle = SparseDecode(replaced, _dense_stand_ins(model, kernel))
    handle.attach()
    return handle


def _dense_stand_ins(model: nn.Module, kernel: str) -> list[Slot]:
    """Every ``nn.Linear`` of the model and its ``DenseLinear``, where the kernels are the native
    ones; none with the PyTorch kernel, whose dense products are PyTorch's already."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears or _kernel_name(linears[0][1].weight, kernel) != "native":
        return []
    slots = []
    for name, linear in linears:
        parent_path, _, child = name.rpartition(".")
        slots.append((model.get_submodule(parent_path), child, DenseLinear(linear)))
    return slots


def _sparse_mlp(layer: nn.Module, anatomy: Anatomy, value, index: int, break_even, kernel: str):
    mlp_path, _, _ = anatomy.down.rpartition(".")
    parent_path, _, mlp_name = mlp_path.rpartition(".")
    weights = GatedWeights.of(layer, anatomy)
    threshold = _threshold(value, weights.up.shape[0], (index, "act"), weights.up)
    act = layer.get_submodule(anatomy.act)
    sparse = SparseGatedMLP(layer.get_submodule(mlp_path), weights, act, threshold, break_even, kernel)
    return layer.get_submodule(parent_path), mlp_name, sparse


def _sparse_linears(layer: nn.Module, paths: list[str], value, key: Key, break_even, kernel: str):
    """The projections at ``paths``, which all read the input ``key`` thresholds, over one
    ``SharedInput``: (parent, name, replacement) each."""
    linears = [layer.get_submodule(path) for path in paths]
    threshold = _threshold(value, linears[0].in_features, key, linears[0].weight)
    shared = SharedInput(linears, kernel)
    replaced = []
    for member, (path, linear) in enumerate(zip(paths, linears)):
        parent_path, _, name = path.rpartition(".")
        sparse = SparseInputLinear(linear, threshold, shared, member, break_even)
        replaced.append((layer.get_submodule(parent_path), name, sparse))
    return replaced


@dataclass(frozen=True)
class Decoded:
    ids: torch.Tensor  # [new_tokens] greedy choices
    logits: torch.Tensor  # [new_tokens, vocab] the logits each choice was taken from
    step_seconds: list[float]  # wall time of each single-token step (prefill excluded)


@torch.inference_mode()
def greedy_decode(
    model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, before_step: Callable[[int], object] | None = None,
    forced_ids: torch.Tensor | None = None,
) -> Decoded:
    """Batch-1 greedy decoding with a KV cache, like ``generate(do_sample=False)`` without its
    per-step extras (logits processors, stopping checks) and without stopping at EOS, so every run
    decodes exactly ``new_tokens`` and the timing is the model's alone. ``before_step(i)`` runs
    untimed before single-token step ``i``. On a GPU each step is timed to its kernels' end.

    With ``forced_ids`` (another decoding's ``ids``), step ``i`` is fed ``forced_ids[i]`` instead of
    this decoding's own choice (teacher forcing): ``ids`` still holds its own choices, each made
    after the same tokens as the other decoding's, so one differing choice does not change the
    inputs of every step after it."""
    ids = torch.as_tensor(prompt_ids).view(1, -1).to(next(model.parameters()).device)
    finish = torch.cuda.synchronize if ids.device.type == "cuda" else lambda: None  # kernels launch asynchronously
    if new_tokens < 1 or ids.shape[1] < 1:
        raise ValueError(f"greedy_decode needs a prompt and new_tokens >= 1, got {ids.shape[1]} tokens, {new_tokens}")
    if forced_ids is not None and len(forced_ids) < new_tokens - 1:
        raise ValueError(f"greedy_decode needs {new_tokens - 1} forced_ids for {new_tokens} tokens, got {len(forced_ids)}")
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    logits, seconds = [out.logits[0, -1]], []
    for step in range(new_tokens - 1):
        if before_step:
            before_step(step)
        finish()
        start = time.perf_counter()
        fed = logits[-1].argmax() if forced_ids is None else forced_ids[step].to(ids.device)
        out = model(input_ids=fed.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        finish()
        seconds.append(time.perf_counter() - start)
        logits.append(out.logits[0, -1])
    stacked = torch.stack(logits)
    return Decoded(stacked.argmax(-1), stacked, seconds)


@dataclass(frozen=True)
class Agreement:
    """How sparse decoding compares with the masked dense model (``sparse_vs_masked``)."""

    max_module_diff: float  # max over sparse-path calls: |kernel - masked dense| / max |masked dense|, same input
    tokens_checked: int  # greedy tokens decoded both ways
    tokens_matched: int  # how many of them, from the first, both ways chose alike
    max_logit_diff: float  # over the steps both ways decoded from the same tokens
    forced_tokens_matched: int  # how many the sparse model chose alike when fed the masked model's tokens


def module_tolerance(dtype: torch.dtype) -> float:
    """The largest ``Agreement.max_module_diff`` a correct kernel shows: a sparse sum adds the same
    terms as the dense product in another order, a few units of rounding of the output's scale."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def sparse_vs_masked(
    model: nn.Module, thresholds: Mapping[Key, torch.Tensor | float], prompt_ids: torch.Tensor, new_tokens: int,
    kernel: str = "auto", kv_dense: bool = False,
) -> Agreement:
    """Check sparse decoding (kernel forced on every step) against the masked dense model
    (``hooks.apply_thresholds``) over ``new_tokens`` greedy tokens; raises if a kernel computes
    something else, so a speed is never reported for it. The masked model runs its products on the
    sparse steps' dense engine (``SparseDecode.attach_dense``), so a gate or a projection no
    threshold feeds rounds alike on both sides (on BLAS, a CATS 0.5 decoding of the 1.5B parted
    from it after 8 of 16 tokens, bench/RESULTS.md).

    The check is per module, on the same input: every sparse call's output must equal the dense
    masked computation of that input within ``module_tolerance``. The mask is then the same on
    both sides (both threshold the same values), so what differs is only the order of additions.
    End to end the two decodings are compared too, but only reported: their inputs differ by that
    rounding, a value within it of its threshold is zeroed on one side only, and the key/value it
    changes stays in the cache, so on large models (TEAL thresholds ~380k values a step on
    Qwen2.5-1.5B) greedy tokens can part after a few steps with every module exact. From there on
    the two decodings see other tokens, so ``tokens_matched`` says where they first part, not how
    often they would choose alike; the sparse model is therefore also fed the masked model's tokens
    (``greedy_decode``'s ``forced_ids``), and ``forced_tokens_matched`` counts the steps at which it
    chose the same next token after the same tokens.
    """
    engine = SparseDecode([], _dense_stand_ins(model, kernel))
    engine.attach_dense()
    try:
        with apply_thresholds(model, thresholds, kv_dense=kv_dense):
            reference = greedy_decode(model, prompt_ids, new_tokens)
    finally:
        engine.remove()
    module_diffs = [0.0]

    def compare(module: SparseModule, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        expected = module.masked_dense(inputs[0])
        scale = float(expected.abs().max())
        module_diffs.append(float((output - expected).abs().max()) / scale if scale else float(output.abs().max()))

    with sparsify_for_decode(model, thresholds, break_even=1.0, kernel=kernel, kv_dense=kv_dense) as handle:
        hooks = [module.register_forward_hook(compare) for module in handle.modules]
        try:
            sparse = greedy_decode(model, prompt_ids, new_tokens)
        finally:
            for hook in hooks:
                hook.remove()
        forced = greedy_decode(model, prompt_ids, new_tokens, forced_ids=reference.ids)
    worst, tolerance = max(module_diffs), module_tolerance(next(model.parameters()).dtype)
    if not worst <= tolerance:
        raise AssertionError(f"a sparse kernel's output differs from the masked dense computation of the same input "
                             f"by {worst:.3g} of its scale (tolerance {tolerance:.1g})")
    differ = (sparse.ids != reference.ids).nonzero()
    matched = int(differ[0]) if len(differ) else new_tokens
    same_inputs = min(matched + 1, new_tokens)  # step i's logits follow the tokens before it
    logit_diff = float((sparse.logits[:same_inputs] - reference.logits[:same_inputs]).abs().max())
    if matched < new_tokens:
        log.warning("sparse and masked dense decoding part at token %d of %d (every module within %.1g of the "
                    "masked dense computation of its input)", matched, new_tokens, worst)
    forced_differ = (forced.ids != reference.ids).nonzero().flatten().tolist()
    if forced_differ:
        top2 = reference.logits[forced_differ].topk(2).values
        log.warning("fed the masked dense model's tokens, sparse decoding chose otherwise at step(s) %s, where the "
                    "masked model's two best logits lie %s apart and the two models' logits differ by up to %.3g",
                    forced_differ, [round(float(m), 4) for m in top2[:, 0] - top2[:, 1]],
                    float((forced.logits - reference.logits).abs().max()))
    return Agreement(worst, new_tokens, matched, logit_diff, new_tokens - len(forced_differ))


def _dense_step_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights a dense decoding step reads: every projection's, the output embedding included."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, SparseInputLinear, DenseLinear))]


def dense_step_bytes(model: nn.Module) -> int:
    """The bytes of weights a dense decoding step reads: over a step's time, the rate the machine
    streamed weights at (``native_dense_gbps``; low in spells of outside load)."""
    return sum(weight.numel() * weight.element_size() for weight in _dense_step_weights(model))


def weight_bytes_bound(model: nn.Module, handle: SparseDecode) -> float:
    """Dense decoding step's weight bytes over the sparse step's, if each sparsified module read
    exactly the share of its skippable weights (``skippable_params``) that its inputs left active
    in the steps it ran (the handle's counts): what skipping weights can gain where reading them is
    all a step costs."""
    dense = sum(weight.numel() for weight in _dense_step_weights(model))
    skipped = sum((1 - fraction) * m.skippable_params for m, fraction in zip(handle.modules, handle.active_fractions()))
    return dense / (dense - skipped)


def decode_speed(
    model: nn.Module,
    thresholds: Mapping[Key, torch.Tensor | float],
    prompt_ids: torch.Tensor,
    new_tokens: int,
    repeats: int = 3,
    break_even: float | None = None,
    kernel: str = "auto",
    kv_dense: bool = False,
) -> dict[str, float]:
    """Decoding tokens/s of the dense model as PyTorch runs it, of the dense model on the kernels'
    engine, of the model sparsified for decoding, and of its kernels keeping every channel.

    ``repeats`` greedy runs of ``new_tokens``, whose single-token steps rotate between the four
    (swapping modules is free); tokens/s is one over a side's median step time. All sides thus
    see the same KV-cache lengths and, step by step, the same load from other processes, which a
    run-by-run comparison on a shared machine does not. Prefill is not timed. Beside the speeds:
    the active fraction the sparse steps saw and the weight-bytes ``bound`` at it.

    ``speedup`` is over the dense model as PyTorch runs it; ``native_speedup`` over the dense
    model on the engine the sparse steps run on (``SparseDecode.attach_dense``: every linear on
    ``dense_product``); ``kernel_speedup`` over the kernels at full activity
    (``SparseDecode.keep_every_channel``), where they read the weights as the sparse steps do.
    They differ where the machine's BLAS streams weights at another rate than the C loops: on an
    AMD EPYC VM MKL's matvec read 17-24 GB/s and ``dense_product`` 37-48, so ``speedup`` exceeded
    ``bound`` there (bench/RESULTS.md). The fastest dense step is the fair baseline:
    ``fair_speedup``, the smallest of the three, is the one to quote.

    ``native_dense_gbps``, the native dense step's weight bytes over its median time, is the rate
    the machine streamed weights at while the ratios were timed. Where other processes took memory
    bandwidth it falls, and every ratio climbs towards ``bound`` (weight reads become a larger share
    of each step): on the AMD EPYC VM a teal 0.3 job read 1.365 against a bound of 1.331 in such a
    spell and 1.208 idle (bench/RESULTS.md). A fair speedup above the bound is logged as suspect.
    """
    if new_tokens < len(_SIDES) + 1:
        raise ValueError(f"decode_speed needs new_tokens >= {len(_SIDES) + 1}: the first token comes from prefill, "
                         f"then one step a side")
    handle = sparsify_for_decode(model, thresholds, break_even, kernel, kv_dense)
    steps: dict[str, list[float]] = {side: [] for side in _SIDES}
    try:
        for _ in range(repeats):
            timed = greedy_decode(model, prompt_ids, new_tokens, lambda step: _use(handle, _SIDES[step % len(_SIDES)]))
            for step, seconds in enumerate(timed.step_seconds):
                steps[_SIDES[step % len(_SIDES)]].append(seconds)
    finally:
        handle.remove()
        handle.keep_every_channel(False)
    dense, native_dense, kernel_dense, sparse = (1 / statistics.median(steps[side]) for side in _SIDES)
    fastest_dense = max(dense, native_dense, kernel_dense)
    speed = {"dense_tps": dense, "sparse_tps": sparse, "speedup": sparse / dense, "kernel_dense_tps": kernel_dense,
             "kernel_speedup": sparse / kernel_dense, "native_dense_tps": native_dense,
             "native_speedup": sparse / native_dense, "fair_speedup": sparse / fastest_dense,
             "bound": weight_bytes_bound(model, handle), "active_fraction": handle.active_fraction(),
             "native_dense_gbps": native_dense * dense_step_bytes(model) / 1e9}
    if speed["fair_speedup"] > speed["bound"]:
        log.warning("fair speedup %.3f exceeds its weight-bytes bound %.3f: other processes probably took memory "
                    "bandwidth (the native dense step streamed %.1f GB/s); rerun on an idle machine",
                    speed["fair_speedup"], speed["bound"], speed["native_dense_gbps"])
    return speed


_SIDES = ("dense", "native_dense", "kernel_dense", "sparse")  # decode_speed's sides, in the order its steps rotate


def _use(handle: SparseDecode, side: str) -> None:
    if side == "dense":
        handle.remove()
    elif side == "native_dense":
        handle.attach_dense()
    else:
        handle.attach()
        handle.keep_every_channel(side == "kernel_dense")
