"""Time and peak memory of exact_quantiles against numpy.percentile, measured in the same run.

Part 1: data that fits in memory, fed to exact_quantiles in chunks (views, no copies) and to
numpy.percentile whole. Part 2: values generated chunk by chunk and never materialised, the
count growing 10x per row; exact_quantiles' peak memory must stay flat. Peak memory is
tracemalloc's (numpy reports its buffers to it), counted above what existed before the call.

    .venv/bin/python bench/bench_quantiles.py [--values 2e7] [--chunk 1e6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np

from actsparse.quantiles import exact_quantiles

QS = np.round(np.linspace(0.1, 0.9, 9), 2)


def measure(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, int, np.ndarray]:
    """Best wall time over repeats, peak traced bytes of one run, and its result."""
    tracemalloc.start()
    result = run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best, peak, result


def in_memory(values: int, chunk: int, repeats: int) -> None:
    data = np.abs(np.random.default_rng(0).standard_normal(values, dtype=np.float32))

    def chunks() -> Iterator[np.ndarray]:
        return (data[i : i + chunk] for i in range(0, values, chunk))

    ours = measure(lambda: exact_quantiles(chunks, QS), repeats)
    ref = measure(lambda: np.percentile(data, 100 * QS), repeats)
    assert np.array_equal(ours[2], ref[2]), "exact_quantiles differs from numpy.percentile"
    print(f"\n{values:.0e} float32 |N(0,1)| values in memory, chunks of {chunk:.0e}, 9 quantiles")
    print(f"{'':>18} {'time s':>8} {'peak MiB':>9}")
    for name, (seconds, peak, _) in (("exact_quantiles", ours), ("numpy.percentile", ref)):
        print(f"{name:>18} {seconds:8.3f} {peak / 2**20:9.1f}")
    print(f"{'ratio ours/numpy':>18} {ours[0] / ref[0]:8.2f} {ours[1] / ref[1]:9.3f}")


def generated(values: int, chunk: int) -> Callable[[], Iterator[np.ndarray]]:
    """Chunks of the same pseudo-random values on every call, none of them kept."""

    def chunks() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(1)
        for start in range(0, values, chunk):
            size = min(chunk, values - start)
            yield np.abs(rng.standard_normal(size, dtype=np.float32))

    return chunks


def streaming(values: int, chunk: int, steps: int) -> None:
    print(f"\nStreaming, generated chunk by chunk (chunks of {chunk:.0e}), 9 quantiles")
    print(f"{'values':>10} {'data MiB':>9} {'time s':>8} {'peak MiB':>9} {'peak / first':>12}")
    first = None
    for step in range(steps):
        count = values * 10**step
        seconds, peak, _ = measure(lambda: exact_quantiles(generated(count, chunk), QS), 1)
        first = first or peak
        data = 4 * count / 2**20
        print(f"{count:10.0e} {data:9.0f} {seconds:8.3f} {peak / 2**20:9.1f} {peak / first:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=float, default=2e7, help="values held in memory")
    parser.add_argument("--chunk", type=float, default=1e6, help="values per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, best kept")
    parser.add_argument("--stream-from", type=float, default=1e6, help="first streamed count")
    parser.add_argument("--stream-steps", type=int, default=3, help="10x steps when streaming")
    args = parser.parse_args()
    in_memory(int(args.values), int(args.chunk), args.repeats)
    streaming(int(args.stream_from), int(args.chunk), args.stream_steps)


if __name__ == "__main__":
    main()
