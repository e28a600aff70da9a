"""Stored against storeless calibration on SmolLM2-135M: disk bytes, peak memory and wall time.

For each calibration size (4k, 16k, 64k tokens by default) and the methods cats and chess
(exact, fitted on the pipeline's 100-level grid), both modes run as the workflow runs them, each
step a fresh process (its peak RSS is its own):

* stored: ``collect_activations`` into a zarr store (act and up, float16), then one fit per method
  reading the store;
* storeless: the shard summary (statistics and magnitude counts, no store), then one fit per method
  rerunning the forwards (``sources.ForwardSource``);
* plain: one forward over the same tokens with no hooks, the unit of the ratios.

Printed per size: disk bytes written, peak RSS (the largest of the mode's processes), time (the
sum of its processes' work: after the model is loaded and the corpus tokenized, which a stored
fit does not need), each also as a ratio to the plain forward, the forwards the mode makes over
the calibration tokens, the wall time of its processes (start-up and model loads included), and
whether both modes' thresholds are identical (they must be).
Then the stored bytes projected for Llama-3-8B and Mistral-7B shapes at 131,072 tokens, from the
bytes per value this run's stores took.

One shard, one torch thread, the model in float32 on the CPU, ``seq_len`` 512, batch 4.

    .venv/bin/python bench/bench_calibration.py --model results/models/smollm2-135m [--tokens 4096 16384 65536]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from actsparse.registry import requirements

METHODS = ("cats", "chess")
# As the workflow collects for them: every component they fit on (act, up), magnitude counts of
# the masked ones (act) and channel sums of those read for scales (up, chess's m_c)
_NEEDS = [requirements(method) for method in METHODS]
COMPONENTS = sorted({c for need in _NEEDS for c in need.collect})
COUNTED = sorted({c for need in _NEEDS for c in need.masks})
SUMMED = sorted(set(COMPONENTS) - set(COUNTED))
SEQ_LEN, BATCH = 512, 4
CORPUS = "resources/data/wikitext-2-raw/wiki.valid.raw.gz"
PAPER_TOKENS = 131072
# From each model's config.json (num_hidden_layers, hidden_size, intermediate_size); no download.
SHAPES = {"Llama-3-8B": (32, 4096, 14336), "Mistral-7B": (32, 4096, 14336)}
# Values a token per layer the stored mode collects: cats+chess (act, up), all five methods
# (gate, up, act, h of the FFN width; ffn_in, attn_in, o_in of the hidden width).
METHOD_SETS = {"cats+chess": (2, 0), "all five methods": (4, 3)}


def _setup(model_dir: str, tokens: int):
    from actsparse import corpora, models
    from actsparse.collect import shard_slices

    global _READY
    torch.set_num_threads(1)
    model, tokenizer = models.load_model(Path(model_dir), "cpu", "float32")
    corpus = corpora.tokenize(corpora.load_text({"path": CORPUS}), tokenizer, tokens)
    ids = corpus["input_ids"]
    _READY = time.perf_counter()  # the model loaded and the corpus tokenized: the work starts
    return model, ids, shard_slices(len(ids), 1, SEQ_LEN)[0], models.bos_id(tokenizer)


def _plain(model_dir: str, tokens: int, out: Path) -> dict:
    from actsparse.collect import shard_forwards

    model, ids, part, bos = _setup(model_dir, tokens)
    with shard_forwards(model, ids, part, (), SEQ_LEN, BATCH, bos, lambda *value: None) as forwards:
        for _ in forwards:
            pass
    return {}


def _collect(model_dir: str, tokens: int, out: Path) -> dict:
    from actsparse.collect import collect_shard

    model, ids, part, bos = _setup(model_dir, tokens)
    collect_shard(model, ids, part, out, COMPONENTS, SEQ_LEN, BATCH, "float16", {}, "smollm2", bos,
                  summed=SUMMED, counted=COUNTED)
    return {}


def _fit(model_dir: str, tokens: int, out: Path, method: str, storeless: bool) -> dict:
    from actsparse import methods, sources

    source = out
    if storeless:
        model, ids, _, bos = _setup(model_dir, tokens)
        source = sources.ForwardSource(model, ids, [out], SEQ_LEN, BATCH, bos)
    params = {"seq_len": SEQ_LEN} if method == "chess" else {}  # as the workflow passes it
    fitted = methods.fit(method, source if storeless else [out], methods.GRID, params)
    digest = {f"{s}/{k}": t.view(torch.int64).sum().item() for s, level in fitted.items() for k, t in level.items()}
    return {"forwards": getattr(source, "forwards", 0), "thresholds": digest}


_READY: float | None = None  # when a child's setup ended (None: it needed none)


def child(task: str, model_dir: str, tokens: int, out: str, *args: str) -> None:
    start = time.perf_counter()
    if task == "fit":
        result = _fit(model_dir, tokens, Path(out), args[0], args[1] == "storeless")
    else:
        result = {"plain": _plain, "collect": _collect}[task](model_dir, tokens, Path(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result | {"seconds": time.perf_counter() - (_READY or start), "peak_bytes": peak}))


def run(*args) -> dict:
    """One step in a fresh process: ``seconds`` its work, ``wall`` the whole process."""
    command = [sys.executable, __file__, "--child", *map(str, args)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1]) | {"wall": time.perf_counter() - start}


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def measure(model_dir: str, tokens: int, directory: Path) -> dict:
    plain = run("plain", model_dir, tokens, directory / "none")
    modes = {}
    for mode, target in (("stored", directory / "stored" / "shard-0.zarr"),
                         ("storeless", directory / "storeless" / "shard-0.stats.safetensors")):
        target.parent.mkdir()
        steps = [run("collect", model_dir, tokens, target)]
        steps += [run("fit", model_dir, tokens, target, method, mode) for method in METHODS]
        modes[mode] = {
            "disk": disk_bytes(target.parent),
            "peak": max(step["peak_bytes"] for step in steps),
            "seconds": sum(step["seconds"] for step in steps),
            "wall": sum(step["wall"] for step in steps),
            "forwards": 1 + sum(step.get("forwards", 0) for step in steps),
            "thresholds": [step.get("thresholds") for step in steps[1:]],
        }
        shutil.rmtree(target.parent)
    return {"plain": plain, **modes}


def report(tokens: int, result: dict) -> None:
    plain, stored, storeless = result["plain"], result["stored"], result["storeless"]
    same = stored["thresholds"] == storeless["thresholds"]
    print(f"\n{tokens} calibration tokens; plain forward {plain['seconds']:.1f} s ({plain['wall']:.1f} s with "
          f"start-up and model load), peak {plain['peak_bytes'] / 2**20:.0f} MiB; thresholds identical: {same}")
    print(f"{'':>10} {'disk MB':>9} {'peak MiB':>9} {'time s':>8} {'time/plain':>10} {'peak/plain':>10} {'forwards':>8}"
          f" {'wall s':>8}")
    for name, mode in (("stored", stored), ("storeless", storeless)):
        print(f"{name:>10} {mode['disk'] / 1e6:9.2f} {mode['peak'] / 2**20:9.0f} {mode['seconds']:8.1f} "
              f"{mode['seconds'] / plain['seconds']:10.2f} {mode['peak'] / plain['peak_bytes']:10.2f} {mode['forwards']:8d}"
              f" {mode['wall']:8.1f}")
    print(f"{'ratio':>10} {stored['disk'] / storeless['disk']:9.0f} {stored['peak'] / storeless['peak']:9.2f} "
          f"{stored['seconds'] / storeless['seconds']:8.2f}   (stored / storeless)")
    per_forward = storeless["seconds"] / storeless["forwards"] / plain["seconds"]
    print(f"storeless time per forward it makes / plain forward: {per_forward:.2f}")


def projection(bytes_per_value: float) -> None:
    print(f"\nprojected stored bytes at {PAPER_TOKENS} calibration tokens ({bytes_per_value:.2f} B per value, as measured):")
    for name, (layers, hidden, ffn) in SHAPES.items():
        for methods, (ffn_parts, hidden_parts) in METHOD_SETS.items():
            values = layers * (ffn_parts * ffn + hidden_parts * hidden) * PAPER_TOKENS
            print(f"  {name:>11} {methods:>17}: {values * bytes_per_value / 1e9:7.0f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    args = parser.parse_args()
    from actsparse.models import load_anatomy

    config = json.loads((Path(args.model) / "config.json").read_text())
    assert load_anatomy(Path(args.model)).gated
    bytes_per_value = None
    for tokens in args.tokens:
        with tempfile.TemporaryDirectory() as directory:
            result = measure(args.model, tokens, Path(directory))
        report(tokens, result)
        values = tokens // SEQ_LEN * SEQ_LEN * config["num_hidden_layers"] * len(COMPONENTS) * config["intermediate_size"]
        bytes_per_value = result["stored"]["disk"] / values
    projection(bytes_per_value)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
    else:
        main()
