"""The ``actsparse`` command: what a config will run, a result table in the terminal, and the
differences between two result directories."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from actsparse import formats

REPO = Path(__file__).resolve().parent.parent
NUMERIC_KINDS = "fc"  # float and complex columns are compared as measurements
# `show --format`: the terminal table, or the text the pipeline writes beside the CSV (to paste)
SHOW_FORMATS = {"markdown": formats.markdown, "latex": formats.latex}


def _snakemake_plan(configfile: str | None, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--dry-run", "--quiet", "rules"]
    if configfile:
        cmd += ["--configfile", configfile]
    return subprocess.run(cmd + extra).returncode


def _render(frame: pd.DataFrame, title: str) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "iuf" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(formats.cell(v) for v in row))
    Console().print(table)


def _read_table(results: Path, name: str) -> pd.DataFrame:
    path = results / "tables" / f"{name}.csv"
    if not path.is_file():
        available = sorted(p.stem for p in (results / "tables").glob("*.csv"))
        raise SystemExit(f"no table {path}; available: {', '.join(available) or 'none'}")
    return pd.read_csv(path)


def compare_tables(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Rows matched on the non-measurement columns; each measurement as a, b and b - a."""
    keys = [c for c in a.columns if a[c].dtype.kind not in NUMERIC_KINDS and c in b.columns]
    values = [c for c in a.columns if c not in keys and c in b.columns]
    merged = a.merge(b, on=keys, how="outer", suffixes=("_a", "_b"), indicator=True)
    for column in values:
        merged[f"{column}_diff"] = merged[f"{column}_b"] - merged[f"{column}_a"]
    ordered = keys + [f"{c}{s}" for c in values for s in ("_a", "_b", "_diff")] + ["_merge"]
    return merged[ordered].rename(columns={"_merge": "present_in"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actsparse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("list", help="the jobs a config would run now (a Snakemake dry run)")
    plan.add_argument("--configfile")
    show = commands.add_parser("show", help="print a result table, e.g. perplexity or perplexity_wide")
    show.add_argument("table")
    show.add_argument("--results", type=Path, default=Path("results"))
    show.add_argument("--format", choices=["terminal", *SHOW_FORMATS], default="terminal")
    compare = commands.add_parser("compare", help="compare one table of two result directories")
    compare.add_argument("results_a", type=Path)
    compare.add_argument("results_b", type=Path)
    compare.add_argument("--table", default="perplexity")
    args, extra = parser.parse_known_args(argv)

    if args.command == "list":
        return _snakemake_plan(args.configfile, extra)
    if args.command == "show":
        frame = _read_table(args.results, args.table)
        if args.format == "terminal":
            _render(frame, f"{args.results}/tables/{args.table}.csv")
        else:
            print(SHOW_FORMATS[args.format](frame), end="")
        return 0
    diff = compare_tables(_read_table(args.results_a, args.table), _read_table(args.results_b, args.table))
    _render(diff, f"{args.table}: {args.results_a} (a) vs {args.results_b} (b)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
