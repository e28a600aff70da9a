"""How predictable SmolLM2's FFN activity is at cats 0.5: the lookahead predictor of the default
run against its baselines and two ceilings, per layer, side by side in one run.

Columns per layer (F1 over all token x neuron cells of the evaluation tokens):

* ``lookahead``: the pipeline's predictor (``pattern_study.predictor_study``): a low-rank MLP on
  the residual-stream input of layer l - k (``--lookahead``, default 1);
* ``own_input``: the same MLP on layer l's own FFN input (k = 0, as in Deja Vu): what a
  predictor of that size reaches with no lookahead at all;
* ``gate_early``: layer l's own gate projection applied to the normalised residual stream of
  layer l - k and thresholded like the layer: a full-rank, weight-sharing predictor that costs
  a third of the FFN's weights; it shows how far one layer of lookahead moves the pattern;
* ``frequency``, ``hot_set``: the static baselines of the pipeline.

With ``--sweep-tokens`` it instead measures how far more capacity and more training data take
the lookahead predictor: for each training size (tokens of the calibration text, WikiText-2's
validation split, beyond the pipeline's 4,096) and each rank, its F1 on the training tokens and
on the evaluation tokens, per layer; each size trains on at least as many samples as 20 epochs
of 4,096 tokens (``--epochs`` epochs, more for smaller sizes), so no size is short of steps.

The imported model, corpora and cats thresholds at 0.50 must exist (the pipeline's
import_model, prepare_corpus and select_thresholds rules):

    .venv/bin/python bench/bench_predictor.py [--lookahead 1] [--rank 64] [--epochs 20] [--layers 5 15 25]
    .venv/bin/python bench/bench_predictor.py --sweep-tokens 4096 16384 65536 --sweep-ranks 64 256 1024 \
        --epochs 5 --layers 5 15 25 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from actsparse import corpora, methods, models, pattern_study, patterns, stages

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
MODEL = "smollm2-135m"
CALIBRATION_TEXT = REPO / "resources/data/wikitext-2-raw/wiki.valid.raw.gz"
SWEEP_SAMPLES = 20 * 4096  # the least each sweep size trains on: the default run's 20 epochs of 4,096 tokens


def gate_early(model, activity: pattern_study.Activity, layer: int, lookahead: int, threshold: float) -> np.ndarray:
    """Active mask of ``layer`` computed by its own norm, gate and activation from layer l - k's
    input (for k = 0 the FFN input itself, already normalised: then the mask is exact)."""
    block = model.model.layers[layer]
    x = torch.from_numpy(pattern_study.lookahead_features(activity, layer, lookahead))
    with torch.no_grad():
        act = block.mlp.act_fn(block.mlp.gate_proj(x if lookahead == 0 else block.post_attention_layernorm(x)))
    return (act.abs() >= threshold).numpy()


def print_row(row: dict) -> None:
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def predicted(net: patterns.Predictor, x: np.ndarray) -> np.ndarray:
    """The active mask ``net`` predicts for the rows of ``x``, as the pipeline thresholds it."""
    return net.scores(x) >= patterns.ACTIVE_SCORE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lookahead", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="default: every layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep-tokens", type=int, nargs="*", default=None,
                        help="training sizes of the capacity sweep (instead of the per-layer comparison)")
    parser.add_argument("--sweep-ranks", type=int, nargs="*", default=[64, 256, 1024])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_model(RESULTS / "models" / MODEL, "cpu", "float32")
    thresholds_path = RESULTS / f"thresholds/{MODEL}/cats/0.50.safetensors"
    thresholds = methods.load_thresholds(thresholds_path)[0]
    ids = {name: corpora.load_corpus(RESULTS / f"corpora/{MODEL}/{name}.safetensors")["input_ids"][:count].tolist()
           for name, count in (("calibration", args.train_tokens), ("evaluation", args.eval_tokens))}
    layers = args.layers if args.layers is not None else list(range(len(model.model.layers)))
    bos = models.bos_id(tokenizer)
    if args.sweep_tokens:
        capacity_sweep(model, tokenizer, bos, thresholds_path, ids["evaluation"], layers, args)
        return
    with stages.sparsified(model, [thresholds_path], "all"):
        train, test = (pattern_study.gather_activity(model, ids[name], bos, 256, None, layers, True)
                       for name in ("calibration", "evaluation"))
    rows, seconds = [], 0.0
    for layer in layers:
        actual, seen = test.patterns[layer], train.patterns[layer]
        row = {"layer": layer, "active_fraction": float(actual.mean())}
        for name, k in (("lookahead", args.lookahead), ("own_input", 0)):
            started = time.perf_counter()
            net = patterns.train_predictor(pattern_study.lookahead_features(train, layer, k), seen, args.rank,
                                           args.epochs, 0)
            if name == "lookahead":
                seconds += time.perf_counter() - started
            row[name] = patterns.evaluate_predictor(predicted(net, pattern_study.lookahead_features(test, layer, k)),
                                                    actual)["f1"]
        threshold = float(thresholds[layer, "act"])
        row["gate_early"] = patterns.evaluate_predictor(gate_early(model, test, layer, args.lookahead, threshold),
                                                        actual)["f1"]
        row["frequency"] = patterns.evaluate_predictor(patterns.frequency_baseline(seen), actual)["f1"]
        row["hot_set"] = patterns.evaluate_predictor(patterns.hot_neurons(seen, 0.5), actual)["f1"]
        rows.append(row)
        print_row(row)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    means = table.drop(columns=["layer"]).mean()
    print("mean over layers: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    print(f"lookahead (k={args.lookahead}, rank {args.rank}, {args.epochs} epochs, {train.tokens} tokens) training: "
          f"{seconds:.1f} s for {len(layers)} layers")


def capacity_sweep(model, tokenizer, bos: int, thresholds_path: Path, eval_ids: list[int], layers: list[int],
                   args) -> None:
    """Lookahead F1 on the training and the evaluation tokens per (training size, rank, layer)."""
    text = corpora.load_text({"path": CALIBRATION_TEXT})
    train_ids = corpora.tokenize(text, tokenizer, max(args.sweep_tokens))["input_ids"].tolist()
    with stages.sparsified(model, [thresholds_path], "all"):
        train, test = (pattern_study.gather_activity(model, ids, bos, 256, layers, (), True)
                       for ids in (train_ids, eval_ids))
    rows = []
    for tokens in sorted(args.sweep_tokens):
        epochs = max(args.epochs, -(-SWEEP_SAMPLES // tokens))
        for rank in args.sweep_ranks:
            for layer in layers:
                features, seen = pattern_study.lookahead_features(train, layer, args.lookahead), train.patterns[layer]
                started = time.perf_counter()
                net = patterns.train_predictor(features[:tokens], seen[:tokens], rank, epochs, 0)
                row = {"tokens": tokens, "rank": rank, "epochs": epochs, "layer": layer,
                       "train_f1": patterns.evaluate_predictor(predicted(net, features[:tokens]), seen[:tokens])["f1"],
                       "eval_f1": patterns.evaluate_predictor(
                           predicted(net, pattern_study.lookahead_features(test, layer, args.lookahead)),
                           test.patterns[layer])["f1"],
                       "seconds": time.perf_counter() - started}
                rows.append(row)
                print_row(row)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=("g", "g", "g", "g", ".3f", ".3f", ".1f")))
    print(table.pivot_table(index=["tokens", "rank"], values=["train_f1", "eval_f1"]).to_markdown(floatfmt=".3f"))


if __name__ == "__main__":
    main()
