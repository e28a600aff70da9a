"""Where a decoding step's time goes, dense against sparse: per-module timing on a real model.

For one threshold file of the pipeline (``results/thresholds/{model}/{method}/{sparsity}``),
greedy batch-1 decoding with dense and sparse steps alternating (as ``kernels.decode_speed``
times them). Forward hooks time, per step and summed over the decoder layers, the FFN (and
inside it the gate and up/down products, or the sparse kernel's call), the attention block, the
lm_head and the rest of the step (embedding, norms, residual adds, the Python around them).
Printed per part: median milliseconds a step dense and sparse, their ratio, and the weight
bytes each side reads there as GB/s, so a kernel that streams its rows slower than the dense
matvec shows up as a lower bandwidth than the dense side's.

    .venv/bin/python bench/bench_decode_modules.py \
        --model-dir results/models/qwen2.5-coder-1.5b \
        --thresholds results/thresholds/qwen2.5-coder-1.5b/cats/0.50.safetensors \
        --corpus results/corpora/qwen2.5-coder-1.5b/evaluation.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from actsparse import corpora, methods, models
from actsparse.anatomy import anatomy_of, decoder_layers
from actsparse.kernels import DenseLinear, SparseGatedMLP, SparseInputLinear, greedy_decode, sparsify_for_decode


class Timers:
    """Seconds per part, summed within the current step."""

    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)
        self.steps: dict[bool, list[dict[str, float]]] = {False: [], True: []}

    def time(self, module: nn.Module, part: str) -> list:
        started: list[float] = []

        def before(*_):
            started.append(time.perf_counter())

        def after(*_):
            self.step[part] += time.perf_counter() - started.pop()

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def wrap_kernel(self, sparse: SparseGatedMLP) -> None:
        step = sparse.kernel.step

        def timed(*args):
            started = time.perf_counter()
            try:
                return step(*args)
            finally:
                self.step["ffn: up+down (sparse kernel)"] += time.perf_counter() - started

        sparse.kernel.step = timed


def _weight_bytes(modules) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--thresholds", required=True)
    parser.add_argument("--corpus", required=True, help="an evaluation corpus of the pipeline (prompt tokens)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = models.load_model(Path(args.model_dir), "cpu", "float32", own_memory=True)
    anatomy = anatomy_of(model)
    text = corpora.load_corpus(Path(args.corpus))["input_ids"][: args.prompt_tokens - 1]
    prompt = torch.cat([torch.tensor([models.bos_id(tokenizer)]), text])
    values, metadata = methods.load_thresholds(Path(args.thresholds))
    kv_dense = methods.requirements(metadata["method"], gated=anatomy.gated).kv_dense

    timers = Timers()
    layers = decoder_layers(model, anatomy)
    mlp_path = anatomy.down.rpartition(".")[0]
    attn_path = anatomy.o.rpartition(".")[0]
    hooks = []
    for layer in layers:
        hooks += timers.time(layer.get_submodule(mlp_path), "ffn")
        hooks += timers.time(layer.get_submodule(attn_path), "attention")
        for name in (anatomy.gate, anatomy.up, anatomy.down):
            hooks += timers.time(layer.get_submodule(name), f"ffn: {name.rpartition('.')[2]} (dense matvec)")
    lm_head_linear = model.get_output_embeddings()
    hooks += timers.time(lm_head_linear, "lm_head")
    dense_bytes = {
        "ffn": _weight_bytes(layer.get_submodule(n) for layer in layers for n in (anatomy.gate, anatomy.up, anatomy.down)),
        "attention": _weight_bytes(layer.get_submodule(n) for layer in layers for n in anatomy.attention_projections),
        "lm_head": _weight_bytes([model.get_output_embeddings()]),
    }

    handle = sparsify_for_decode(model, values, kv_dense=kv_dense)
    sparse_parts: dict[nn.Module, str] = {}
    members: dict[int, list[str]] = defaultdict(list)  # projections of one shared input: one kernel call
    for name, module in model.named_modules():
        if isinstance(module, SparseInputLinear):
            members[id(module.shared)].append(name.rpartition(".")[2])
    for module in model.modules():
        if isinstance(module, SparseGatedMLP):  # stands in for the MLP, whose hooks then do not fire
            hooks += timers.time(module, "ffn")
            timers.wrap_kernel(module)
            sparse_parts[module] = "ffn: up+down (sparse kernel)"
        elif isinstance(module, SparseInputLinear):  # the first member called computes the group's outputs
            sparse_parts[module] = f"sparse {'+'.join(members[id(module.shared)])} (kernel)"
            hooks += timers.time(module, sparse_parts[module])
    for name, module in model.named_modules():  # the products a sparse step keeps dense, on the kernels' engine
        if isinstance(module, DenseLinear):
            lm_head = module.original[0] is lm_head_linear
            hooks += timers.time(module, "lm_head" if lm_head else f"dense {name.rpartition('.')[2]} (C matvec)")
    handle.remove()
    order: list[bool] = []  # per single-token step: was it sparse

    def before_step(step: int) -> None:
        if order:
            timers.steps[order[-1]].append(dict(timers.step))
        timers.step.clear()
        order.append(step % 2 == 1)
        (handle.attach if order[-1] else handle.remove)()

    with torch.inference_mode():
        for _ in range(args.repeats):
            order.clear()
            timed = greedy_decode(model, prompt, args.new_tokens, before_step)
            timers.steps[order[-1]].append(dict(timers.step))
            for record, seconds in zip(_last(timers, order), timed.step_seconds):
                record["step"] = seconds
    handle.remove()
    for hook in hooks:
        hook.remove()
    sparse_bytes: dict[str, float] = defaultdict(float)  # weight bytes a sparse step read, per part
    for module, fraction in zip(handle.modules, handle.active_fractions()):
        sparse_bytes[sparse_parts[module]] += fraction * module.skippable_params * 4
    _report(timers, dense_bytes, sparse_bytes, handle, metadata)


def _last(timers: Timers, order: list[bool]) -> list[dict[str, float]]:
    """The records of the run just decoded, in step order."""
    taken = {side: iter(timers.steps[side][-order.count(side):]) for side in (False, True)}
    return [next(taken[sparse]) for sparse in order]


def _report(timers: Timers, dense_bytes: dict[str, int], sparse_bytes: dict[str, float], handle, metadata) -> None:
    def median(side: bool, part: str) -> float:
        return statistics.median(step.get(part, 0.0) for step in timers.steps[side])

    parts = sorted({p for side in timers.steps.values() for step in side for p in step} - {"step"})
    print(f"{metadata['method']}: active fraction {handle.active_fraction():.3f}, "
          f"{len(timers.steps[False])} dense and {len(timers.steps[True])} sparse steps")
    print("| part | dense ms | sparse ms | sparse / dense | weight GB/s dense | weight GB/s sparse |")
    print("|---|---|---|---|---|---|")
    for part in ["step", *parts]:
        dense, sparse = median(False, part) * 1e3, median(True, part) * 1e3
        ratio = f"{sparse / dense:.3f}" if dense and sparse else ""
        dense_rate = f"{dense_bytes[part] / dense / 1e6:.1f}" if part in dense_bytes and dense else ""
        sparse_rate = f"{sparse_bytes[part] / sparse / 1e6:.1f}" if part in sparse_bytes and sparse else ""
        print(f"| {part} | {dense:.2f} | {sparse:.2f} | {ratio} | {dense_rate} | {sparse_rate} |")
    rest = {side: median(side, "step") - sum(median(side, p) for p in ("ffn", "attention", "lm_head")) for side in (False, True)}
    print(f"| rest (embedding, norms, residuals, Python) | {rest[False] * 1e3:.2f} | {rest[True] * 1e3:.2f} | | |")


if __name__ == "__main__":
    main()
