"""Time of activation collection against a plain forward of the same tokens, in the same run.

The plain forward is what collection runs without its hooks (the base model over the same
``[BOS] + sequence`` batches; the logits are not needed, so neither runs the LM head); the full
forward, with the LM head, is printed for reference. Two partial runs show where the time goes:
hooks that only cast each value to the stored dtype and copy it, and hooks that also update the
store's statistics (what ``StoreWriter.append`` does before queueing). Each backend's store is
written once per repeat into a temporary folder. Wall and process CPU seconds (all threads) are
the best over repeats; on a shared machine the CPU column is the steadier one. Bytes per value:
the store's size on disk (its statistics file excluded) over the activation values it holds.

    .venv/bin/python bench/bench_collect.py [MODEL_DIR] [--tokens 2048] [--seq-len 512]
        [--batch-size 4] [--components act attn_in ffn_in gate h o_in up] [--dtype float16] [--repeats 1]
        [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from actsparse import corpora
from actsparse.collect import collect_shard, shard_slices
from actsparse.hooks import Hooks, Sink, capture
from actsparse.models import bos_id, load_model
from actsparse.stats import StoreStats
from actsparse.store import STORED_DTYPES, CorpusSlice, open_store

CORPUS = {"path": "resources/data/wikitext-2-raw/wiki.valid.raw.gz"}


def best_time(run: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Best wall and process CPU seconds (all threads, the writer's included) over repeats."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default="results/models/smollm2-135m", type=Path)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--components", nargs="+", default=["act", "attn_in", "ffn_in", "gate", "h", "o_in", "up"])
    parser.add_argument("--dtype", default="float16", choices=sorted(STORED_DTYPES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def model_batches(bos_id: int, tokens: torch.Tensor, part: CorpusSlice, seq_len: int,
                  batch_size: int) -> list[torch.Tensor]:
    """The ``[BOS] + sequence`` batches ``collect_shard`` runs, built here for the plain forwards."""
    bos = torch.full((batch_size, 1), bos_id)
    sequences = tokens[part.token_start : part.token_stop].long().view(-1, seq_len)
    return [torch.cat([bos[: len(b)], b], dim=1) for b in sequences.split(batch_size)]


class Bench:
    """The model and tokens of one run; every timed variant goes through the same batches."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dtype = STORED_DTYPES[args.dtype]
        self.model, tokenizer = load_model(args.model_dir, "cpu", "float32")
        self.bos_id = bos_id(tokenizer)
        self.tokens = corpora.tokenize(corpora.load_text(CORPUS), tokenizer, args.tokens)["input_ids"]
        self.part = shard_slices(len(self.tokens), 1, args.seq_len, corpus="wikitext-2 validation")[0]
        self.batches = model_batches(self.bos_id, self.tokens, self.part, args.seq_len, args.batch_size)
        self.stats = StoreStats()
        self.plain = (1.0, 1.0)

    def forward(self, net: torch.nn.Module, sink: Sink | None = None) -> Callable[[], None]:
        def run() -> None:
            hooks = capture(self.model, self.args.components, sink) if sink else Hooks([])
            with hooks, torch.inference_mode():
                for batch in self.batches:
                    net(input_ids=batch, use_cache=False)

        return run

    def cast_and_copy(self, layer: int, component: str, value: torch.Tensor) -> None:
        value[:, 1:].to(self.dtype).clone()

    def cast_and_stats(self, layer: int, component: str, value: torch.Tensor) -> None:
        self.stats.update(layer, component, value[:, 1:].reshape(-1, value.shape[-1]).to(self.dtype))

    def collect(self, path: Path) -> Callable[[], None]:
        a = self.args
        return lambda: collect_shard(self.model, self.tokens, self.part, path, a.components, a.seq_len,
                                     a.batch_size, self.dtype, {}, a.model_dir.name, self.bos_id)

    def row(self, name: str, run: Callable[[], None] | tuple[float, float], disk: str = "") -> None:
        """Print ``run``'s times (measured here unless given) against the plain forward's."""
        wall, cpu = run if isinstance(run, tuple) else best_time(run, self.args.repeats)
        print(f"{name:>24} {wall:7.2f} {cpu:7.2f} {wall / self.plain[0]:10.2f} {cpu / self.plain[1]:9.2f} {disk}",
              flush=True)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    base = bench.model.base_model
    bench.forward(base)()  # warm-up: first-call allocations and kernel selection
    bench.plain = best_time(bench.forward(base), args.repeats)
    print(f"{args.model_dir.name}: {bench.part.tokens} tokens as {len(bench.batches)} batches of {args.batch_size}"
          f" x [BOS] + {args.seq_len}, components {' '.join(args.components)}, stored {args.dtype}, "
          f"{torch.get_num_threads()} torch threads; best of {args.repeats}")
    print(f"{'run':>24} {'wall s':>7} {'cpu s':>7} {'wall/plain':>10} {'cpu/plain':>9} {'MB disk':>8} {'B/value':>7}")
    bench.row("plain forward", bench.plain)
    bench.row("full forward (LM head)", bench.forward(bench.model))
    bench.row("hooks: cast + host copy", bench.forward(base, bench.cast_and_copy))
    bench.row("hooks: cast + stats", bench.forward(base, bench.cast_and_stats))
    with tempfile.TemporaryDirectory() as workdir:
        for suffix in (".zarr", ".h5"):
            path = Path(workdir) / f"shard{suffix}"
            times = best_time(bench.collect(path), args.repeats)
            with open_store(path) as store:
                values = sum(store.shape(*key)[0] * store.shape(*key)[1] for key in store.keys())
            size = disk_bytes(path)
            bench.row(f"collect {suffix}", times, f"{size / 1e6:8.1f} {size / values:7.3f}")
    print(f"{values:,d} activation values stored")


if __name__ == "__main__":
    main()
