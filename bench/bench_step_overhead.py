"""What a decoding step spends outside its weight products, and how much of that a compiled step
removes: the time a dense and a sparse step share, which bounds sparse decoding's speedup
(bench/RESULTS.md, the seventh session's scale run).

1. With ``--model-dir``, ``--thresholds`` and ``--corpus``: the model sparsified for decoding (the
   kernels picked as the pipeline picks them), single-token steps alternating between computing
   every product module (sparse modules and dense stand-ins) and replaying the outputs each
   returned in the step before. Every step decodes the same token at the same position (the KV
   cache is cropped back), so the replayed outputs are exact, but no weight is read and the
   caches stay warm. Printed: median step time, time inside the product modules and outside
   them, both ways; outside computed minus outside replayed is what cold caches cost.
2. Always: a Qwen2 of ``--layers`` decoder layers with the 1.5B's attention heads but a tiny width,
   so its products cost next to nothing and a step is its per-op time: eager against
   ``torch.compile`` (inductor, default mode; the compile time printed too).

    .venv/bin/python bench/bench_step_overhead.py \
        --model-dir results/models/qwen2.5-coder-1.5b \
        --thresholds results/thresholds/qwen2.5-coder-1.5b/cats/0.50.safetensors \
        --corpus results/corpora/qwen2.5-coder-1.5b/evaluation.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

from actsparse import corpora, methods, models
from actsparse.anatomy import anatomy_of
from actsparse.kernels import DenseLinear, SparseGatedMLP, SparseInputLinear, sparsify_for_decode


class Replay:
    """Wraps the product modules' ``forward``: records their outputs in call order, or returns the
    recorded ones in the same order; seconds spent inside them summed per step."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.outputs: list[torch.Tensor] = []
        self.replaying, self.next, self.inside = False, 0, 0.0
        for module in modules:
            module.forward = self._wrap(module.forward)

    def _wrap(self, forward):
        def wrapped(*args, **kwargs):
            started = time.perf_counter()
            if self.replaying:
                output = self.outputs[self.next]
                self.next += 1
            else:
                output = forward(*args, **kwargs)
                self.outputs.append(output)
            self.inside += time.perf_counter() - started
            return output

        return wrapped

    def begin_step(self, replaying: bool) -> None:
        self.replaying, self.next, self.inside = replaying, 0, 0.0
        if not replaying:
            self.outputs = []


@torch.inference_mode()
def computed_against_replayed(args) -> None:
    model, tokenizer = models.load_model(Path(args.model_dir), "cpu", "float32", own_memory=True)
    text = corpora.load_corpus(Path(args.corpus))["input_ids"][: args.prompt_tokens - 1]
    prompt = torch.cat([torch.tensor([models.bos_id(tokenizer)]), text]).view(1, -1)
    values, metadata = methods.load_thresholds(Path(args.thresholds))
    kv_dense = methods.requirements(metadata["method"], gated=anatomy_of(model).gated).kv_dense
    sparsify_for_decode(model, values, kv_dense=kv_dense)
    replay = Replay([m for m in model.modules() if isinstance(m, (SparseGatedMLP, SparseInputLinear, DenseLinear))])
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token, cache = out.logits[0, -1].argmax().view(1, 1), out.past_key_values
    seconds: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for step in range(2 * args.steps):
        replaying = bool(step % 2)  # a replay always follows the computed step it replays
        replay.begin_step(replaying)
        started = time.perf_counter()
        model(input_ids=token, past_key_values=cache, use_cache=True)
        seconds[replaying].append((time.perf_counter() - started, replay.inside))
        cache.crop(-1)
    print(f"{metadata['method']} {metadata.get('target_sparsity', '')}, {args.steps} steps each, medians (ms):")
    print("| products | step | inside product modules | outside |\n|---|---|---|---|")
    for replaying, label in ((False, "computed"), (True, "replayed (no weights read)")):
        step, inside = (statistics.median(row[i] for row in seconds[replaying]) for i in (0, 1))
        outside = statistics.median(total - within for total, within in seconds[replaying])
        print(f"| {label} | {1e3 * step:.1f} | {1e3 * inside:.1f} | {1e3 * outside:.1f} |")


@torch.inference_mode()
def _step_times(model: nn.Module, forward, steps: int) -> list[float]:
    """Single-token steps of ``forward`` after a 64-token prefill, on a static cache."""
    cache = StaticCache(config=model.config, max_cache_len=64 + steps)
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(64))
    token, seconds = out.logits[:, -1:].argmax(-1), []
    for i in range(steps):
        started = time.perf_counter()
        out = forward(input_ids=token, past_key_values=cache, use_cache=True, cache_position=torch.tensor([64 + i]))
        token = out.logits[:, -1:].argmax(-1)
        seconds.append(time.perf_counter() - started)
    return seconds


def eager_against_compiled(args) -> None:
    config = Qwen2Config(hidden_size=96, intermediate_size=192, num_hidden_layers=args.layers, num_attention_heads=12,
                         num_key_value_heads=2, head_dim=8, vocab_size=512, max_position_embeddings=512)
    model = Qwen2ForCausalLM(config).eval()
    compiled = torch.compile(model.forward, dynamic=False)
    started = time.perf_counter()
    _step_times(model, compiled, 2)
    compile_seconds = time.perf_counter() - started
    eager, fast = [], []
    for _ in range(3):  # alternating
        eager += _step_times(model, model.forward, args.steps)[2:]
        fast += _step_times(model, compiled, args.steps)[2:]
    print(f"Qwen2, {args.layers} layers, hidden 96, 12/2 heads: eager {1e3 * statistics.median(eager):.2f} ms a step, "
          f"compiled {1e3 * statistics.median(fast):.2f} ms (compiling and two steps: {compile_seconds:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir")
    parser.add_argument("--thresholds")
    parser.add_argument("--corpus", help="an evaluation corpus of the pipeline (prompt tokens)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the narrow Qwen2 (1.5B: 28)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    given = [args.model_dir, args.thresholds, args.corpus]
    if any(given) and not all(given):
        parser.error("--model-dir, --thresholds and --corpus go together")
    torch.set_num_threads(args.threads)
    if all(given):
        computed_against_replayed(args)
    eager_against_compiled(args)


if __name__ == "__main__":
    main()
