"""Forward time of the masked (sparsified) model against the dense model, per method, in one run.

For each method's fitted thresholds at one sparsity (the files the pipeline wrote under
``results/thresholds/{model}/{method}/{sparsity}.safetensors``), the same evaluation batches
run dense, masked (``hooks.apply_thresholds`` alone) and masked while measuring (what
``eval_perplexity`` does: ``sparsifier.sparsified``, which also counts zeros for the achieved
sparsity). The variants take turns batch by batch and each time is the median over batches, so
a burst of other work on a shared machine lands on all of them alike. Goal: masked / dense
<= 1.05.

    .venv/bin/python bench/bench_mask.py [--model smollm2-135m] [--sparsity 0.50] [--batches 4]
        [--batch-size 1] [--window 512] [--threads 2]

Run the default pipeline first (``make run``), which imports the model and fits the thresholds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from actsparse import corpora, hooks, methods, models, sparsifier
from actsparse.anatomy import anatomy_of

REPO = Path(__file__).resolve().parent.parent
Variant = Callable[[], AbstractContextManager]


def batches(model_dir: Path, count: int, batch_size: int, window: int) -> list[torch.Tensor]:
    """``count`` batches of ``[BOS] + window - 1`` evaluation tokens."""
    tokenizer = models.load_tokenizer(model_dir)
    ids = corpora.load_corpus(REPO / f"results/corpora/{model_dir.name}/evaluation.safetensors")["input_ids"]
    rows = len(ids) // (window - 1)
    if rows < batch_size:
        raise SystemExit(f"the evaluation corpus holds {rows} windows of {window}, fewer than one batch")
    windows = ids[: rows * (window - 1)].view(rows, window - 1)
    bos = torch.full((rows, 1), models.bos_id(tokenizer), dtype=windows.dtype)
    windows = torch.cat([bos, windows], dim=1)
    return [windows[(i * batch_size) % rows :][:batch_size] for i in range(count)]


@torch.inference_mode()
def interleaved_medians(model, inputs: list[torch.Tensor], variants: dict[str, Variant]) -> dict[str, float]:
    """Median forward seconds per batch of each variant, the variants taking turns per batch."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for batch in [inputs[0], *inputs]:  # the first batch warms up and is not counted
        for name, variant in variants.items():
            with variant():
                start = time.perf_counter()
                model(input_ids=batch, use_cache=False)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def method_variants(model, path: Path) -> dict[str, Variant]:
    values, metadata = methods.load_thresholds(path)
    kv_dense = methods.requirements(metadata["method"], gated=anatomy_of(model).gated).kv_dense
    return {
        "dense": nullcontext,
        "masked": lambda: hooks.apply_thresholds(model, values, kv_dense=kv_dense),
        "masked+counted": lambda: sparsifier.sparsified(model, values, kv_dense),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", default="0.50")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = REPO / "results/models" / args.model
    model, _ = models.load_model(model_dir)
    inputs = batches(model_dir, args.batches, args.batch_size, args.window)
    files = sorted((REPO / "results/thresholds" / args.model).glob(f"*/{args.sparsity}.safetensors"))
    if not files:
        raise SystemExit(f"no thresholds at sparsity {args.sparsity} under results/thresholds/{args.model}; run the pipeline")
    print(f"{args.model}, {args.batches} batches of {args.batch_size} x {args.window} tokens, "
          f"{torch.get_num_threads()} threads, load average {Path('/proc/loadavg').read_text().split()[0]}")
    print(f"{'method':>8} {'dense s':>8} {'masked/dense':>13} {'masked+counted/dense':>21}")
    for path in files:
        seconds = interleaved_medians(model, inputs, method_variants(model, path))
        dense = seconds["dense"]
        print(f"{path.parent.name:>8} {dense:8.3f} {seconds['masked'] / dense:13.3f} "
              f"{seconds['masked+counted'] / dense:21.3f}", flush=True)
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
