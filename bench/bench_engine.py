"""Weight streaming rates of every product a decoding step runs, per shape of a model: is the
dense baseline as fast as the sparse kernels' engine?

``decode_speed`` compares sparse steps with PyTorch's dense model (``speedup``), with the dense
model on the kernels' engine (``native_speedup``: every linear on ``kernels.dense_product``, a C
matvec reading 8 weight rows side by side) and with the sparse kernels keeping every channel
(``kernel_speedup``). Where the machine's BLAS streams weights slower than the C loops (MKL on
AMD CPUs), those differ; this benchmark shows by how much, shape by shape.

Per weight shape of ``--model-dir``'s first decoder layer (random float32 weights, as many copies
as the model has layers, so they come from memory as in decoding; the lm_head once): GB/s of
weights read by MKL's matvec (``F.linear``), by ``dense_product``, and by the library's sparse
kernels over every input and over a random half of them (``NativeLinearKernel``, and
``NativeKernel`` for the gated FFN's up+down). Rotating, medians of ``--sweeps``.

    .venv/bin/python bench/bench_engine.py --model-dir results/models/qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from actsparse import models
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.kernels import GatedWeights, NativeKernel, NativeLinearKernel, dense_product, native_library


def stream_rates(model: nn.Module, sweeps: int) -> None:
    """Prints one table row per weight shape, and one for the gated FFN's up+down kernel (each
    row's weights freed before the next row's are made)."""
    anatomy = anatomy_of(model)
    layers = decoder_layers(model, anatomy)
    shapes = {name.rpartition(".")[2]: tuple(layers[0].get_submodule(name).weight.shape)
              for name in (*anatomy.attention_projections, anatomy.gate, anatomy.up, anatomy.down)}
    shapes["lm_head"] = tuple(model.get_output_embeddings().weight.shape)
    gen = torch.Generator().manual_seed(0)
    print("| weight | shape | copies | MKL GB/s | dense_product GB/s | ratio | sparse kernel, all GB/s | sparse kernel, half GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (out, inputs) in shapes.items():
        print(_projection_row(name, out, inputs, 1 if name == "lm_head" else len(layers), gen, sweeps))
    print(_ffn_row(GatedWeights.of(layers[0], anatomy), len(layers), gen, sweeps))


def _projection_row(name: str, out: int, inputs: int, copies: int, gen: torch.Generator, sweeps: int) -> str:
    weights = [torch.randn(out, inputs, generator=gen) for _ in range(copies)]
    kernels = [NativeLinearKernel(w, None) for w in weights]
    products = [dense_product(w, None) for w in weights]
    x = torch.randn(inputs, generator=gen)
    half = torch.where(torch.rand(inputs, generator=gen) < 0.5, x, torch.zeros(()))
    zero = torch.zeros(())
    sides = {
        "mkl": lambda: [F.linear(x, w) for w in weights],
        "dense_product": lambda: [product(x) for product in products],
        "all": lambda: [k.step(x, zero, inputs) for k in kernels],
        "half": lambda: [k.step(half, zero, inputs) for k in kernels],
    }
    rates = _rates(sides, sweeps, copies * out * inputs * 4, {"half": float((half != 0).float().mean())})
    return (f"| {name} | {out} x {inputs} | {copies} | {rates['mkl']:.1f} | {rates['dense_product']:.1f} | "
            f"{rates['dense_product'] / rates['mkl']:.2f} | {rates['all']:.1f} | {rates['half']:.1f} |")


def _ffn_row(ffn: GatedWeights, copies: int, gen: torch.Generator, sweeps: int) -> str:
    channels, hidden = ffn.up.shape
    blocks = [NativeKernel(GatedWeights(ffn.gate, None, torch.randn(ffn.up.shape, generator=gen), None,
                                        torch.randn(ffn.down.shape, generator=gen), None)) for _ in range(copies)]
    x, zero = torch.randn(hidden, generator=gen), torch.zeros(())
    a_all, a_half = torch.ones(channels), (torch.rand(channels, generator=gen) < 0.5).float()
    sides = {"all": lambda: [k.step(x, a_all, zero, channels) for k in blocks],
             "half": lambda: [k.step(x, a_half, zero, channels) for k in blocks]}
    rates = _rates(sides, sweeps, copies * 2 * channels * hidden * 4, {"half": float(a_half.mean())})
    return f"| up+down (NativeKernel) | 2 x {channels} x {hidden} | {copies} | | | | {rates['all']:.1f} | {rates['half']:.1f} |"


def _rates(sides: dict, sweeps: int, nbytes: int, fractions: dict[str, float]) -> dict[str, float]:
    """GB/s of each side, the sides rotating sweep by sweep; ``fractions``: share of the bytes a side reads."""
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(sweeps):
        for side, run in sides.items():
            start = time.perf_counter()
            run()
            seconds[side].append(time.perf_counter() - start)
    return {side: fractions.get(side, 1.0) * nbytes / statistics.median(s) / 1e9 for side, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--sweeps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native_library() is None:
        raise SystemExit("this benchmark needs a C compiler (the native kernels)")
    model, _ = models.load_model(Path(args.model_dir), "cpu", "float32", own_memory=True)
    with torch.inference_mode():
        stream_rates(model, args.sweeps)


if __name__ == "__main__":
    main()
