"""Side-by-side perplexity of methods at equal target sparsity and at equal activated FFN
parameters, from a run's perplexity results (results/eval/ppl/{model}/{method}/{sparsity}.json).

    PYTHONPATH=. .venv/bin/python bench/compare_methods.py --results results --model smollm2-135m \
        --methods teal teal-greedy wina-greedy cats chess --levels 0.3 0.5

Prints two Markdown tables: per method and target level the perplexity, its ratio to teal's
(uniform) at the same level, the achieved sparsity and the activated FFN parameters; then each
method's perplexity interpolated at equal skipped FFN work (``tables.perplexity_at_budget``) along
every level of it the results hold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from actsparse import columns, tables


def grid_results(results: Path, model: str, methods: list[str], levels: list[float]) -> pd.DataFrame:
    """Every perplexity result of the dense baseline and the methods; each method needs ``levels``."""
    needed = [results / f"eval/ppl/{model}/dense/0.00.json"]
    needed += [results / f"eval/ppl/{model}/{m}/{s:.2f}.json" for m in methods for s in levels]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"missing results (run their eval_perplexity jobs first): {missing}")
    found = {p for m in methods for p in (results / f"eval/ppl/{model}/{m}").glob("*.json")}
    return tables.collect_results(sorted(found | set(needed)), columns.PERPLEXITY)


def by_target(frame: pd.DataFrame, reference: str, levels: list[float]) -> pd.DataFrame:
    rows = frame[(frame.method != "dense") & frame.target_sparsity.isin(levels)].copy()
    rows[columns.ACTIVATED_FFN_PARAMS] = 1 - rows.skipped_ffn_params
    base = rows[rows.method == reference].set_index("target_sparsity").ppl
    rows[f"ppl / {reference}"] = rows.ppl / rows.target_sparsity.map(base)
    return rows[["method", "target_sparsity", "ppl", f"ppl / {reference}", "achieved_sparsity",
                 columns.ACTIVATED_FFN_PARAMS]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["teal", "teal-greedy", "wina-greedy", "cats", "chess"])
    parser.add_argument("--levels", nargs="+", type=float, default=[0.3, 0.5])
    args = parser.parse_args()
    frame = grid_results(args.results, args.model, args.methods, args.levels)
    dense = frame[frame.method == "dense"].ppl.iloc[0]
    print(f"dense ppl {dense:.3f}\n")
    print(by_target(frame, args.methods[0], args.levels).to_markdown(index=False, floatfmt=".3f"))
    print()
    print(tables.perplexity_at_budget(frame).drop(columns="model").to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
