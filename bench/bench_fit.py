"""Time and peak memory of methods.fit over a sparsity grid against numpy.percentile.

Part 1: two shard stores of synthetic SiLU activations; ``fit("cats", ...)`` streams them, numpy
gets the same values loaded into memory (load timed apart from numpy.percentile). Both must
agree bit for bit. Once for 9 levels, once for the pipeline's 100-level ``methods.GRID``.
Part 2: ``fit`` over 9 levels as the calibration tokens grow 10x; its peak memory must stay flat
once a shard holds more than one read block (about 2**20 values), as with the defaults.

Both run on one thread. Peak memory is the peak resident set size of a fresh process running one measurement, above its
size when the measurement starts (tracemalloc cannot see torch's buffers); results come back as
JSON on its stdout.

    .venv/bin/python bench/bench_fit.py [--layers 2] [--channels 1024] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actsparse.methods import GRID, fit
from actsparse.store import CorpusSlice, StoreWriter, open_store

LEVEL_SETS = {"9 levels": np.round(np.linspace(0.1, 0.9, 9), 2), "GRID": np.array(GRID)}
SHARDS = 2
BATCH = 1024  # tokens per append


def write_stores(directory: Path, layers: int, channels: int, tokens: int) -> list[str]:
    """SHARDS stores of ``tokens`` tokens each, generated batch by batch (never all in memory)."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(SHARDS):
        path = directory / f"shard-{index}.zarr"
        corpus = CorpusSlice("bench", index, SHARDS, index * tokens, (index + 1) * tokens)
        with StoreWriter(path, model="bench", corpus=corpus) as writer:
            for start in range(0, tokens, BATCH):
                rows = min(BATCH, tokens - start)
                for layer in range(layers):
                    gate = torch.randn(rows, channels, generator=generator) * 2
                    writer.append(layer, "act", torch.nn.functional.silu(gate))
        paths.append(str(path))
    return paths


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed_fit(paths: list[str], levels: np.ndarray) -> dict:
    start = time.perf_counter()
    fitted = fit("cats", paths, levels)
    seconds = time.perf_counter() - start
    thresholds = {str(layer): [fitted[float(s)][layer, "act"].item() for s in levels] for layer, _ in fitted[levels[0]]}
    return {"seconds": seconds, "thresholds": thresholds}


def _timed_numpy(paths: list[str], levels: np.ndarray) -> dict:
    start = time.perf_counter()
    stores = [open_store(path) for path in paths]
    values = {
        layer: np.concatenate([chunk.float().abs().numpy() for store in stores for chunk in store.iter_chunks(layer, c)])
        for layer, c in stores[0].keys()
    }
    loaded = time.perf_counter()
    thresholds = {str(layer): np.percentile(v, 100 * levels).tolist() for layer, v in values.items()}
    thresholds = {layer: [0.0 if s == 0 else t for s, t in zip(levels, ts)] for layer, ts in thresholds.items()}
    return {"load_seconds": loaded - start, "seconds": time.perf_counter() - loaded, "thresholds": thresholds}


TASKS = {"fit": _timed_fit, "numpy": _timed_numpy}


def child(task: str, levels: str, paths: list[str]) -> None:
    """One measurement in this fresh process; JSON on stdout."""
    baseline = _rss()
    result = TASKS[task](paths, LEVEL_SETS[levels])
    print(json.dumps(result | {"peak_bytes": _peak_rss() - baseline}))


def measure(task: str, levels: str, paths: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", task, levels, *paths], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def mib(n: int) -> float:
    return n / 2**20


def in_memory(layers: int, channels: int, tokens: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        paths = write_stores(Path(directory), layers, channels, tokens)
        for levels in LEVEL_SETS:
            compare(paths, levels, f"{layers} layers x {SHARDS * tokens * channels:.2e} values ({SHARDS} "
                    f"shards x {tokens} tokens x {channels} channels)")


def compare(paths: list[str], levels: str, data: str) -> None:
    ours, ref = measure("fit", levels, paths), measure("numpy", levels, paths)
    assert ours["thresholds"] == ref["thresholds"], "fit differs from numpy.percentile"
    print(f"\ncats, {data}, {levels} ({len(LEVEL_SETS[levels])}); thresholds equal bit for bit")
    print(f"{'':>24} {'time s':>8} {'peak MiB':>9}")
    print(f"{'fit (streamed, 2 passes)':>24} {ours['seconds']:8.3f} {mib(ours['peak_bytes']):9.1f}")
    print(f"{'numpy load':>24} {ref['load_seconds']:8.3f}")
    print(f"{'numpy.percentile':>24} {ref['seconds']:8.3f} {mib(ref['peak_bytes']):9.1f}")
    print(f"{'ratio fit/percentile':>24} {ours['seconds'] / ref['seconds']:8.2f} "
          f"{ours['peak_bytes'] / ref['peak_bytes']:9.3f}")
    print(f"{'ratio fit/(load+pct)':>24} {ours['seconds'] / (ref['seconds'] + ref['load_seconds']):8.2f}")


def streaming(channels: int, tokens: int) -> None:
    print(f"\nfit as calibration tokens grow 10x (1 layer, {channels} channels, {SHARDS} shards)")
    print(f"{'tokens':>8} {'data MiB':>9} {'time s':>8} {'peak MiB':>9} {'peak / first':>12}")
    first = None
    for scale in (1, 10):
        with tempfile.TemporaryDirectory() as directory:
            paths = write_stores(Path(directory), 1, channels, tokens * scale)
            result = measure("fit", "9 levels", paths)
        first = first or result["peak_bytes"]
        total = SHARDS * tokens * scale
        data = mib(4 * total * channels)  # as float32, what numpy.percentile would need
        print(f"{total:8d} {data:9.0f} {result['seconds']:8.3f} {mib(result['peak_bytes']):9.1f} "
              f"{result['peak_bytes'] / first:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="layers in part 1")
    parser.add_argument("--channels", type=int, default=1024, help="channels per layer")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per shard (part 2: first row)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # TASK LEVELS STORE...
    args = parser.parse_args()
    # One thread, as the tests run and as numpy.percentile runs: on a small shared CPU more
    # threads make torch's elementwise work on each read block several times slower.
    torch.set_num_threads(1)
    if args.child:
        child(args.child[0], args.child[1], args.child[2:])
        return
    in_memory(args.layers, args.channels, args.tokens)
    streaming(args.channels, args.tokens)


if __name__ == "__main__":
    main()
