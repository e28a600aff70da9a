"""Sparse decoding against the fastest dense engine at hand: is ``kernel_speedup`` the fair number?

``decode_speed`` compares sparse steps with PyTorch's dense model (``speedup``) and with the
sparse kernels keeping every channel (``kernel_speedup``). Neither is the fastest dense step a
machine can run where its BLAS matvec is slow (MKL on AMD CPUs): a plain C matvec, 8 weight rows
side by side per thread (``dense_matvec`` below), streams the same rows in address order. This
benchmark measures, in one run:

Part 1, per weight shape of ``--model-dir``'s first decoder layer (random float32 weights, as
many copies as the model has layers, so they come from memory as in decoding; the lm_head once):
GB/s of weights read by MKL's matvec (``F.linear``), by ``dense_matvec``, and by the library's
sparse kernels over every input and over a random half of them (``NativeLinearKernel``, and
``NativeKernel`` for the gated FFN's up+down). Rotating, medians of ``--sweeps``.

Part 2 (``--thresholds``): greedy batch-1 decoding of the real model, single-token steps
rotating between PyTorch's dense model, the *native dense engine* (every ``nn.Linear``, the
lm_head included, through ``dense_matvec``), the sparse kernels keeping every channel and the
model sparsified for decoding, the last two with every projection they leave dense through
``dense_matvec`` too (a CATS/CHESS gate stays PyTorch's: the
sparse MLP computes it itself, so for those methods the sparse side is slower than one engine
would make it). Printed: tok/s, the speedup over each dense side, and the largest logit
difference of the native dense engine from PyTorch's on the same tokens.

    .venv/bin/python bench/bench_engine.py --model-dir results/models/qwen2.5-coder-1.5b \
        --thresholds results/thresholds/qwen2.5-coder-1.5b/teal/0.50.safetensors \
        --corpus results/corpora/qwen2.5-coder-1.5b/evaluation.safetensors
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from actsparse import corpora, methods, models, native
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.kernels import GatedWeights, NativeKernel, NativeLinearKernel, greedy_decode, sparsify_for_decode

DENSE_SOURCE = r"""
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define THREAD_COUNT omp_get_num_threads()
#else
#define THREAD_ID 0
#define THREAD_COUNT 1
#endif
typedef float vec __attribute__((vector_size(32), aligned(4), may_alias));
#define ROWS 8

static float hsum(vec v) {
    float s = 0;
    for (int l = 0; l < 8; l++) s += v[l];
    return s;
}

/* y = w x + bias (w: out rows of `in` floats); each thread a contiguous share of the rows, read
   ROWS side by side */
void dense_matvec(const float *restrict w, const float *restrict bias, const float *restrict x, int64_t out,
                  int64_t in, float *restrict y, int threads) {
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t units = (out + ROWS - 1) / ROWS, t = THREAD_ID, count = THREAD_COUNT;
        int64_t lo = units * t / count * ROWS, hi = units * (t + 1) / count * ROWS;
        if (hi > out) hi = out;
        for (int64_t i = lo; i < hi; i += ROWS) {
            int rows = hi - i < ROWS ? (int)(hi - i) : ROWS;
            vec acc[ROWS] = {{0}};
            int64_t j = 0;
            for (; j + 8 <= in; j += 8) {
                vec xj = *(const vec *)(x + j);
                for (int q = 0; q < rows; q++) acc[q] += *(const vec *)(w + (i + q) * in + j) * xj;
            }
            for (int q = 0; q < rows; q++) {
                float sum = hsum(acc[q]);
                for (int64_t r = j; r < in; r++) sum += w[(i + q) * in + r] * x[r];
                y[i + q] = sum + (bias ? bias[i + q] : 0);
            }
        }
    }
}
"""


def dense_library() -> ctypes.CDLL:
    lib = native.load("bench dense matvec", DENSE_SOURCE, ("-fopenmp",))
    if lib is None:
        raise SystemExit("this benchmark needs a C compiler")
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.dense_matvec.argtypes = [pointer, pointer, pointer, size, size, pointer, ctypes.c_int]
    return lib


class NativeDense(nn.Module):
    """Stands in for an ``nn.Linear``: one float32 token through ``dense_matvec``, else F.linear."""

    def __init__(self, linear: nn.Linear, lib: ctypes.CDLL) -> None:
        super().__init__()
        self.weight, self.bias, self.lib = linear.weight, linear.bias, lib
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1 or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        x = x.contiguous()
        y = torch.empty(self.out_features)
        self.lib.dense_matvec(self.weight.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                              x.data_ptr(), self.out_features, self.in_features, y.data_ptr(), torch.get_num_threads())
        return y.view(*x.shape[:-1], -1)


class Swap:
    """Every ``nn.Linear`` of a model (as it is now) and its ``NativeDense``, swapped in and out."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL) -> None:
        self.pairs = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], module)
                      for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        self.native = [NativeDense(linear, lib) for _, _, linear in self.pairs]

    def attach(self) -> None:
        for (parent, name, _), replacement in zip(self.pairs, self.native):
            setattr(parent, name, replacement)

    def remove(self) -> None:
        for parent, name, linear in self.pairs:
            setattr(parent, name, linear)


def shapes_part(model: nn.Module, lib: ctypes.CDLL, sweeps: int) -> None:
    anatomy = anatomy_of(model)
    layers = decoder_layers(model, anatomy)
    layer = layers[0]
    shapes = {name.rpartition(".")[2]: tuple(layer.get_submodule(name).weight.shape)
              for name in (*anatomy.attention_projections, anatomy.gate, anatomy.up, anatomy.down)}
    shapes["lm_head"] = tuple(model.get_output_embeddings().weight.shape)
    gen = torch.Generator().manual_seed(0)
    print("| weight | shape | copies | MKL GB/s | dense_matvec GB/s | ratio | sparse kernel, all GB/s | sparse kernel, half GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (out, inputs) in shapes.items():
        copies = 1 if name == "lm_head" else len(layers)
        weights = [torch.randn(out, inputs, generator=gen) for _ in range(copies)]
        kernels = [NativeLinearKernel(w, None) for w in weights]
        x = torch.randn(inputs, generator=gen)
        half = torch.where(torch.rand(inputs, generator=gen) < 0.5, x, torch.zeros(()))
        y = torch.empty(out)
        zero = torch.zeros(())
        sides = {
            "mkl": lambda: [F.linear(x, w) for w in weights],
            "dense_matvec": lambda: [lib.dense_matvec(w.data_ptr(), None, x.data_ptr(), out, inputs, y.data_ptr(),
                                                      torch.get_num_threads()) for w in weights],
            "all": lambda: [k.step(x, zero, inputs) for k in kernels],
            "half": lambda: [k.step(half, zero, inputs) for k in kernels],
        }
        rates = _rates(sides, sweeps, copies * out * inputs * 4, {"half": float((half != 0).float().mean())})
        print(f"| {name} | {out} x {inputs} | {copies} | {rates['mkl']:.1f} | {rates['dense_matvec']:.1f} | "
              f"{rates['dense_matvec'] / rates['mkl']:.2f} | {rates['all']:.1f} | {rates['half']:.1f} |")
        del weights, kernels
    ffn = GatedWeights.of(layer, anatomy)
    channels, hidden = ffn.up.shape
    blocks = [NativeKernel(GatedWeights(ffn.gate, None, torch.randn(ffn.up.shape, generator=gen), None,
                                        torch.randn(ffn.down.shape, generator=gen), None)) for _ in layers]
    x = torch.randn(hidden, generator=gen)
    a_all = torch.ones(channels)
    a_half = (torch.rand(channels, generator=gen) < 0.5).float()
    sides = {"all": lambda: [k.step(x, a_all, torch.zeros(()), channels) for k in blocks],
             "half": lambda: [k.step(x, a_half, torch.zeros(()), channels) for k in blocks]}
    rates = _rates(sides, sweeps, len(layers) * 2 * channels * hidden * 4, {"half": float(a_half.mean())})
    print(f"| up+down (NativeKernel) | 2 x {channels} x {hidden} | {len(layers)} | | | | {rates['all']:.1f} | {rates['half']:.1f} |")


def _rates(sides: dict, sweeps: int, nbytes: int, fractions: dict[str, float]) -> dict[str, float]:
    """GB/s of each side, the sides rotating sweep by sweep; ``fractions``: share of the bytes a side reads."""
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(sweeps):
        for side, run in sides.items():
            start = time.perf_counter()
            run()
            seconds[side].append(time.perf_counter() - start)
    return {side: fractions.get(side, 1.0) * nbytes / statistics.median(s) / 1e9 for side, s in seconds.items()}


def decode_part(model: nn.Module, bos: int, lib: ctypes.CDLL, thresholds: Path, corpus: Path, prompt_tokens: int,
                new_tokens: int, repeats: int) -> None:
    prompt = torch.cat([torch.tensor([bos]), corpora.load_corpus(corpus)["input_ids"][: prompt_tokens - 1]])
    values, metadata = methods.load_thresholds(thresholds)
    kv_dense = methods.requirements(metadata["method"], gated=anatomy_of(model).gated).kv_dense
    handle = sparsify_for_decode(model, values, kv_dense=kv_dense)
    handle.remove()
    swap = Swap(model, lib)
    with torch.inference_mode():
        swap.attach()
        native_logits = greedy_decode(model, prompt, 8).logits
        swap.remove()
        torch_logits = greedy_decode(model, prompt, 8).logits
    sides = ("pytorch dense", "native dense", "kernels, every channel", "sparse")

    def use(side: str) -> None:
        handle.remove()
        (swap.remove if side == "pytorch dense" else swap.attach)()
        if side in ("kernels, every channel", "sparse"):
            handle.attach()
            handle.keep_every_channel(side != "sparse")

    steps: dict[str, list[float]] = {side: [] for side in sides}
    with torch.inference_mode():
        for _ in range(repeats):
            timed = greedy_decode(model, prompt, new_tokens, lambda step: use(sides[step % len(sides)]))
            for step, seconds in enumerate(timed.step_seconds):
                steps[sides[step % len(sides)]].append(seconds)
    handle.remove()
    handle.keep_every_channel(False)
    swap.remove()
    tps = {side: 1 / statistics.median(s) for side, s in steps.items()}
    print(f"\n{metadata['method']} {metadata['target_sparsity']}: active fraction {handle.active_fraction():.3f}; "
          f"native dense logits within {float((native_logits - torch_logits).abs().max()):.2g} of PyTorch's "
          f"(8 greedy steps)")
    print("| side | tok/s | sparse speedup over it |")
    print("|---|---|---|")
    for side in sides:
        print(f"| {side} | {tps[side]:.2f} | {tps['sparse'] / tps[side]:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--thresholds", type=Path, help="a threshold file of the pipeline: part 2 on it")
    parser.add_argument("--corpus", type=Path, help="an evaluation corpus of the pipeline (prompt tokens)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sweeps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-shapes", action="store_true", help="skip part 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = dense_library()
    model, tokenizer = models.load_model(Path(args.model_dir), "cpu", "float32", own_memory=True)
    if not args.no_shapes:
        with torch.inference_mode():
            shapes_part(model, lib, args.sweeps)
    if args.thresholds:
        decode_part(model, models.bos_id(tokenizer), lib, args.thresholds, args.corpus, args.prompt_tokens, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
