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

The imported model, corpora and cats thresholds at 0.50 must exist (the pipeline's
import_model, prepare_corpus and select_thresholds rules):

    .venv/bin/python bench/bench_predictor.py [--lookahead 1] [--rank 64] [--epochs 20] [--layers 5 15 25]
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


def gate_early(model, activity: pattern_study.Activity, layer: int, lookahead: int, threshold: float) -> np.ndarray:
    """Active mask of ``layer`` computed by its own norm, gate and activation from layer l - k's
    input (for k = 0 the FFN input itself, already normalised: then the mask is exact)."""
    block = model.model.layers[layer]
    x = torch.from_numpy(pattern_study.lookahead_features(activity, layer, lookahead))
    with torch.no_grad():
        act = block.mlp.act_fn(block.mlp.gate_proj(x if lookahead == 0 else block.post_attention_layernorm(x)))
    return (act.abs() >= threshold).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lookahead", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="default: every layer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_model(RESULTS / "models" / MODEL, "cpu", "float32")
    thresholds_path = RESULTS / f"thresholds/{MODEL}/cats/0.50.safetensors"
    thresholds = methods.load_thresholds(thresholds_path)[0]
    ids = {name: corpora.load_corpus(RESULTS / f"corpora/{MODEL}/{name}.safetensors")["input_ids"][:count].tolist()
           for name, count in (("calibration", args.train_tokens), ("evaluation", args.eval_tokens))}
    layers = args.layers if args.layers is not None else list(range(len(model.model.layers)))
    bos = models.bos_id(tokenizer)
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
            row[name] = patterns.evaluate_predictor(net.predict(pattern_study.lookahead_features(test, layer, k)),
                                                    actual)["f1"]
        threshold = float(thresholds[layer, "act"])
        row["gate_early"] = patterns.evaluate_predictor(gate_early(model, test, layer, args.lookahead, threshold),
                                                        actual)["f1"]
        row["frequency"] = patterns.evaluate_predictor(patterns.frequency_baseline(seen), actual)["f1"]
        row["hot_set"] = patterns.evaluate_predictor(patterns.hot_neurons(seen, 0.5), actual)["f1"]
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    means = table.drop(columns=["layer"]).mean()
    print("mean over layers: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    print(f"lookahead (k={args.lookahead}, rank {args.rank}, {args.epochs} epochs, {train.tokens} tokens) training: "
          f"{seconds:.1f} s for {len(layers)} layers")


if __name__ == "__main__":
    main()
