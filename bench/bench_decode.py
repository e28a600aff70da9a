"""Decoding speed of sparse FFN execution (actsparse.kernels) against the dense model, in one run.

Part 1, a real model (SmolLM2-135M unless ``--model-dir``): thresholds fitted on the fly
(``--methods``: CATS, a per-layer percentile of |act|; TEAL, of each projection input, over
``--calib-tokens`` WikiText-2 validation tokens), then greedy batch-1 decoding with a KV cache
(``kernels.decode_speed``: dense, sparse and full-activity kernel steps in turn, median step time). Before timing,
every sparsity is checked (``kernels.sparse_vs_masked``): each sparse module's output must equal
the masked dense computation (``hooks.apply_thresholds``) of the same input, and how many greedy
tokens both ways chose alike is printed. Beside each speedup: the weight-bytes bound
(``kernels.weight_bytes_bound``), dense step bytes over the bytes a step still reads when each
module skips exactly the share of its weights its inputs zeroed in the timed steps (the
projections and lm_head are what a step reads).

Part 2, one Llama-7B-shaped FFN (hidden 4096, intermediate 11008, random weights, thresholds
from random inputs): per-token time of the dense MLP against the sparse one.

Every timing is a median over tokens, dense and sparse taking turns token by token, because the
machine this was written on (2 cores) is shared: a burst of other work then lands on both sides.

``--sweep`` measures instead the break-even behind each kernel's ``break_even``: per-token FFN
time of a sparse kernel (never falling back) against dense at active fractions 0.1 to 1.0, on
the 30 SmolLM2 FFNs in turn (so weights come from memory as in decoding) and on the 7B-shaped one.

    .venv/bin/python bench/bench_decode.py [--threads 2] [--kernel auto|torch|native] [--sweep]
    .venv/bin/python bench/bench_decode.py --model-dir results/models/qwen2.5-coder-1.5b \
        --methods cats,teal --sparsities 0.5 --no-layer-7b

The model must have been imported first (default results/models/smollm2-135m, the import_model rule).

``--device cuda`` times part 1 on a GPU, in the model's ``auto`` dtype there (bfloat16), with the
PyTorch kernel (the native kernels are CPU loops): whether sparse decoding gains anything on a GPU
without a kernel of its own. Part 2 and ``--sweep`` stay on the CPU.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from actsparse.anatomy import ANATOMIES, anatomy_of, decoder_layers
from actsparse.hooks import INPUT_COMPONENTS, capture
from actsparse.kernels import (
    KERNELS,
    GatedWeights,
    SparseGatedMLP,
    decode_speed,
    greedy_decode,
    sparse_vs_masked,
    sparsify_for_decode,
)
from actsparse.models import load_model

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "results/models/smollm2-135m"
TEXT = REPO / "resources/data/wikitext-2-raw/wiki.valid.raw.gz"
SPARSITIES = (0.0, 0.3, 0.5, 0.7)
SWEEP_ACTIVE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
COLUMNS = ("model", "method", "sparsity", "device", "dense_tps", "native_dense_tps", "kernel_dense_tps", "sparse_tps",
           "speedup", "native_speedup", "kernel_speedup", "bound", "active_fraction")
THRESHOLDED = {"cats": ("act",), "teal": INPUT_COMPONENTS}  # what each timed method thresholds


def abs_samples(model, token_ids: torch.Tensor, components, window: int = 512) -> dict[tuple[int, str], np.ndarray]:
    """|component| of every layer over the calibration tokens, in windows of ``window`` positions."""
    chunks: dict[tuple[int, str], list[np.ndarray]] = {}

    def sink(layer: int, component: str, value: torch.Tensor) -> None:
        chunks.setdefault((layer, component), []).append(value.abs().flatten().float().cpu().numpy())

    device = next(model.parameters()).device
    with capture(model, list(components), sink), torch.inference_mode():
        for start in range(0, len(token_ids), window):
            model(token_ids[None, start : start + window].to(device))
    return {key: np.concatenate(parts) for key, parts in chunks.items()}


def percentile_thresholds(samples: dict, method: str, sparsity: float) -> dict[tuple[int, str], float]:
    """CATS or TEAL: one threshold per (layer, thresholded component) at the target sparsity."""
    return {key: float(np.percentile(v, 100 * sparsity)) for key, v in samples.items() if key[1] in THRESHOLDED[method]}


def wikitext_tokens(tokenizer, count: int) -> torch.Tensor:
    with gzip.open(TEXT, "rt", encoding="utf-8") as f:
        text = f.read(count * 8)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < count:
        raise ValueError(f"{TEXT} gave {len(ids)} tokens, fewer than the {count} asked for")
    return ids[:count]


def real_model(args) -> tuple[torch.nn.Module, dict, torch.Tensor]:
    """The model, |x| samples of its calibration tokens for the methods' components, and the
    prompt (the tokens after them)."""
    model, tokenizer = load_model(args.model_dir, args.device, own_memory=True)
    tokens = wikitext_tokens(tokenizer, args.calib_tokens + args.prompt_tokens)
    components = {c for method in args.methods for c in THRESHOLDED[method]}
    return model, abs_samples(model, tokens[: args.calib_tokens], components), tokens[args.calib_tokens :]


def real_model_rows(model, samples: dict, prompt: torch.Tensor, args) -> list[dict]:
    rows = []
    for method in args.methods:
        for sparsity in args.sparsities:
            thresholds = percentile_thresholds(samples, method, sparsity)
            agreement = sparse_vs_masked(model, thresholds, prompt, 8, args.kernel)
            with sparsify_for_decode(model, thresholds, args.break_even, args.kernel) as handle:
                greedy_decode(model, prompt, 8)
            speed = decode_speed(model, thresholds, prompt, args.new_tokens, args.repeats, args.break_even, args.kernel)
            print(
                f"  {method} {sparsity:.1f}: paths {dict(handle.paths())}, kernels vs masked dense "
                f"{agreement.max_module_diff:.1e} of scale, {agreement.tokens_matched}/{agreement.tokens_checked} "
                f"tokens alike (max |logit diff| {agreement.max_logit_diff:.1e} till then; fed the masked model's "
                f"tokens, {agreement.forced_tokens_matched} alike), load {_load()}",
                flush=True,
            )
            rows.append(dict(model=Path(args.model_dir).name, method=method, sparsity=sparsity, device=args.device, **speed))
            print_table(rows[-1:])
    return rows


def _mlp_inputs(model, prompt: torch.Tensor) -> list[torch.Tensor]:
    """The first layer's real FFN inputs over the prompt, one [1, 1, hidden] tensor per position."""
    seen = []
    sink = lambda layer, _, value: seen.append(value)  # noqa: E731
    with capture(model, ["ffn_in"], sink, layers=[0]), torch.inference_mode():
        model(prompt[None])
    return [seen[0][:, i : i + 1].clone() for i in range(seen[0].shape[1])]


class _Layer(torch.nn.Module):
    """Holds an MLP at the path the llama anatomy expects (``mlp``)."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


def sparse_mlps(
    mlps: list, inputs: list[torch.Tensor], active: float, break_even: float | None, kernel: str
) -> list[SparseGatedMLP]:
    """Each MLP sparsified with the scalar threshold that leaves ``active`` of its channels on."""
    sparse = []
    for mlp in mlps:
        with torch.inference_mode():
            a = torch.cat([mlp.act_fn(mlp.gate_proj(x)).abs().flatten() for x in inputs])
        threshold = torch.tensor(float(np.percentile(a.numpy(), 100 * (1 - active))))
        weights = GatedWeights.of(_Layer(mlp), ANATOMIES["llama"])
        sparse.append(SparseGatedMLP(mlp, weights, mlp.act_fn, threshold, break_even, kernel))
    return sparse


def layer_7b() -> tuple[LlamaMLP, list[torch.Tensor]]:
    """A Llama-7B-shaped FFN with random weights (std 1/sqrt(hidden)) and random inputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        mlp = LlamaMLP(LlamaConfig(hidden_size=4096, intermediate_size=11008, hidden_act="silu")).eval()
        for p in mlp.parameters():
            p.normal_(0, 4096**-0.5)
    return mlp, [torch.randn(1, 1, 4096) for _ in range(16)]


def layer_7b_rows(mlp: LlamaMLP, inputs: list[torch.Tensor], args) -> list[dict]:
    rows = []
    for sparsity in SPARSITIES:
        sparse = sparse_mlps([mlp], inputs, 1 - sparsity, args.break_even, args.kernel)
        dense_s, sparse_s = _interleaved_medians([[mlp], sparse], inputs, args.layer_tokens)
        rows.append(
            dict(model="llama7b-ffn-layer", method="cats", sparsity=sparsity, device="cpu",
                 dense_tps=1 / dense_s, sparse_tps=1 / sparse_s, speedup=dense_s / sparse_s,
                 bound=1 / (1 - 2 / 3 * sparsity), active_fraction=1 - sparsity)
        )
    return rows


@torch.inference_mode()
def _interleaved_medians(variants: list[list], inputs: list[torch.Tensor], tokens: int) -> list[float]:
    """Median seconds per token of each variant (a list of MLPs run in turn, as the layers of one
    decoding step), the variants taking turns token by token."""
    times: list[list[float]] = [[] for _ in variants]
    for i in range(tokens):
        x = inputs[i % len(inputs)]
        for n, mlps in enumerate(variants):
            start = time.perf_counter()
            for mlp in mlps:
                mlp(x)
            times[n].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def sweep(name: str, mlps: list, inputs: list[torch.Tensor], args) -> None:
    print(f"\nbreak-even sweep, {name}: per-token FFN ms, {args.kernel} kernel forced (break_even=1)")
    print(f"{'active':>7} {'dense':>8} {'sparse':>8} {'sparse/dense':>12}")
    for active in SWEEP_ACTIVE:
        sparse = sparse_mlps(mlps, inputs, active, 1.0, args.kernel)
        dense_s, sparse_s = _interleaved_medians([mlps, sparse], inputs, args.sweep_tokens)
        print(f"{active:7.1f} {1e3 * dense_s:8.2f} {1e3 * sparse_s:8.2f} {sparse_s / dense_s:12.2f}", flush=True)


def print_table(rows: list[dict]) -> None:
    print("\n" + " | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS))


def _load() -> str:
    """1, 5 and 15 minute load averages: how much else ran on the machine meanwhile."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where part 1 runs: cpu or cuda (the PyTorch kernel)")
    parser.add_argument("--model-dir", default=MODEL_DIR, help="an imported model (the import_model rule)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["cats"], help="cats and/or teal")
    parser.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",")], default=list(SPARSITIES))
    parser.add_argument("--no-layer-7b", action="store_true", help="skip part 2")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="decoding runs per row")
    parser.add_argument("--layer-tokens", type=int, default=60, help="timed tokens per 7B-layer row")
    parser.add_argument("--break-even", type=float, default=None, help="default: the kernel's own")
    parser.add_argument("--kernel", choices=["auto", *KERNELS], default="auto")
    parser.add_argument("--sweep", action="store_true", help="measure the break-even fraction instead")
    parser.add_argument("--sweep-tokens", type=int, default=30, help="timed tokens per sweep row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, device {args.device}, kernel {args.kernel}, load average {_load()}")
    unknown = sorted(set(args.methods) - set(THRESHOLDED))
    if unknown:
        parser.error(f"--methods {unknown}: choose from {sorted(THRESHOLDED)}")
    model, samples, prompt = real_model(args)
    if args.sweep:
        mlps = [layer.mlp for layer in decoder_layers(model, anatomy_of(model))]
        sweep(f"{Path(args.model_dir).name} ({len(mlps)} FFNs)", mlps, _mlp_inputs(model, prompt), args)
        sweep("llama7b-ffn-layer", *layer_7b(), args)
    else:
        rows = real_model_rows(model, samples, prompt, args)
        print_table(rows if args.no_layer_7b else rows + layer_7b_rows(*layer_7b(), args))
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
