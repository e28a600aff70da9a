"""The ``actsparse`` command: what a config will run, a result table in the terminal, and the
differences between two result directories.

Terminal tables fit the terminal's width (``COLUMNS`` overrides it): columns that do not fit
continue in a further block below, the table's key columns repeated, so no header is cut short.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from actsparse import columns, formats
from actsparse.config import ConfigError, check_config, load_yaml

REPO = Path(__file__).resolve().parent.parent
# `show --format`: the terminal table, or the text the pipeline writes beside the CSV (to paste)
SHOW_FORMATS = {"markdown": formats.markdown, "latex": formats.latex}
COMPARE_FORMATS = ("text", "markdown", "json")
# compared only when named with --table: it records what made each file (code version, packages),
# which differs between any two runs whatever their results
UNCOMPARED = ("provenance",)
COLUMN_GAP = 3  # characters between two terminal columns: a space of padding either side of a space rule
SHOW_HINT = "pass --results DIR"
COMPARE_HINT = "compare takes two results directories, each holding tables/*.csv"


class InputError(Exception):
    """Input the command cannot use (a missing results directory or table, a table whose keys do
    not identify its rows): reported as a usage error, exit status 2."""


def _parsed_configfiles(configfiles: list[str]) -> list[dict] | None:
    """Each config file parsed, or None after printing the YAML syntax error (file, line and
    column): Snakemake reads ``--configfile`` before the workflow's own checks and reports one
    without file or line."""
    try:
        return [load_yaml(Path(path)) for path in configfiles]
    except ConfigError as error:
        print(error, file=sys.stderr)
        return None


def _check(configfiles: list[str]) -> int:
    """The config the workflow would see (the files merged key by key as Snakemake merges them;
    the default config alone when none is given) checked as the workflow checks it: exit 0, or
    2 after the problems, each naming the key and the file."""
    from snakemake.utils import update_config

    files = configfiles or [str(REPO / "config/config.yaml")]
    parsed = _parsed_configfiles(files)
    if parsed is None:
        return 2
    config: dict = {}
    for document in parsed:
        update_config(config, document)
    try:
        check_config(config, files)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"config ok: {', '.join(files)}")
    return 0


def _snakemake_plan(configfiles: list[str], extra: list[str]) -> int:
    """A Snakemake dry run, each config file parsed first (see ``_parsed_configfiles``)."""
    if _parsed_configfiles(configfiles) is None:
        return 2
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--dry-run", "--quiet", "rules"]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    return subprocess.run(cmd + extra).returncode


# --- reading --------------------------------------------------------------------------------------


def _tables_dir(results: Path, hint: str) -> Path:
    tables = results / "tables"
    if not tables.is_dir():
        raise InputError(f"no results under {results} (no {tables}/); {hint}")
    return tables


def _table_names(results: Path, hint: str) -> set[str]:
    return {path.stem for path in _tables_dir(results, hint).glob("*.csv")}


def _read_table(results: Path, name: str, hint: str) -> pd.DataFrame:
    path = _tables_dir(results, hint) / f"{name}.csv"
    if not path.is_file():
        available = sorted(_table_names(results, hint))
        raise InputError(f"no table {path}; available: {', '.join(available) or 'none'}")
    return pd.read_csv(path)


def table_keys(name: str, frame: pd.DataFrame) -> list[str]:
    """The columns identifying a row (``columns.TABLE_KEYS``); a table not listed there is keyed on
    its text columns."""
    keys = columns.TABLE_KEYS.get(name) or [c for c in frame.columns if not _is_numeric(frame[c])]
    return [k for k in keys if k in frame.columns]


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


# --- terminal tables ------------------------------------------------------------------------------


def _span(names: Sequence[str], widths: dict[str, int]) -> int:
    return sum(widths[n] for n in names) + COLUMN_GAP * max(len(names) - 1, 0)


def column_blocks(names: Sequence[str], keys: Sequence[str], widths: dict[str, int], width: int) -> list[list[str]]:
    """``names`` split into blocks of at most ``width`` characters, each led by the key columns (as
    pandas wraps a wide frame), so every column shows at its full width. Keys are repeated only
    when every other column fits beside them; a column wider than the terminal gets a block of
    its own, its cells folded."""
    others = [n for n in names if n not in keys]
    fits_beside = all(_span([*keys, n], widths) <= width for n in others)
    repeated = list(keys) if fits_beside else []
    blocks, block = [], list(repeated)
    for name in names:
        if name in repeated:
            continue
        if len(block) > len(repeated) and _span([*block, name], widths) > width:
            blocks.append(block)
            block = list(repeated)
        block.append(name)
    return [*blocks, block]


def print_table(frame: pd.DataFrame, title: str, keys: Sequence[str], console: Console) -> None:
    """The table's cells (``formats.cells``, as every rendering shows them), fitted to the console."""
    shown = formats.cells(frame)
    shown.columns = [str(c) for c in frame.columns]
    widths = {c: max([cell_len(c), *map(cell_len, shown[c])]) for c in shown.columns}
    numeric = {str(c): frame[c].dtype.kind in formats.RIGHT_ALIGNED_KINDS for c in frame.columns}
    console.print(title, style="bold", highlight=False)
    for number, block in enumerate(column_blocks(list(shown.columns), [str(k) for k in keys], widths, console.width)):
        if number:
            console.print()
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name in block:
            table.add_column(name, justify="right" if numeric[name] else "left", overflow="fold")
        for row in shown[block].itertuples(index=False):
            table.add_row(*row)
        console.print(table)


def _console() -> Console:
    return Console(width=shutil.get_terminal_size().columns, highlight=False)


# --- comparing ------------------------------------------------------------------------------------


@dataclass
class TableDiff:
    """How one table differs between two runs ``a`` and ``b``."""

    name: str
    keys: list[str]
    rows: pd.DataFrame  # the differing rows: keys, `only_in` (a or b) if a row is on one side only,
    # then `{column}_a`, `{column}_b` and, for numbers, `{column}_diff` (b - a) of each differing column
    notes: list[str] = field(default_factory=list)  # the table or a column present on one side only

    @property
    def count(self) -> int:
        return len(self.rows) + len(self.notes)


def _sparsity_labels(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Sparsity levels as their two-decimal label, the one paths use: 0.5 and 0.50000001 are one
    level, 0.5 and 0.7 never are."""
    levels = [k for k in keys if k in columns.SPARSITY_LEVELS and _is_numeric(frame[k])]
    return frame.assign(**{k: frame[k].map("{:.2f}".format) for k in levels})


def _differs(a: pd.Series, b: pd.Series, rtol: float) -> pd.Series:
    """Where ``a`` and ``b`` differ; numbers within ``rtol`` of the larger magnitude are equal (as
    in ``math.isclose``), missing values equal missing values."""
    same = (a == b) | (a.isna() & b.isna())
    if _is_numeric(a) and _is_numeric(b):
        same |= (a - b).abs() <= rtol * np.maximum(a.abs(), b.abs())
    return ~same


def compare_tables(name: str, a: pd.DataFrame, b: pd.DataFrame, rtol: float = 0.0) -> TableDiff:
    """Rows of ``a`` and ``b`` paired on the table's key columns; the rows whose measurements
    differ beyond ``rtol``, and those present on one side only."""
    notes = [f"column {c} only in {side}" for side, x, y in (("a", a, b), ("b", b, a)) for c in x.columns if c not in y]
    keys = [k for k in table_keys(name, a) if k in b.columns]
    if not keys:
        raise InputError(f"table {name} has no key columns to pair rows on; name them in actsparse.columns.TABLE_KEYS")
    values = [c for c in a.columns if c in b.columns and c not in keys]
    sides = [_sparsity_labels(frame[keys + values], keys) for frame in (a, b)]
    for side, frame in zip("ab", sides):
        if frame.duplicated(keys).any():
            raise InputError(f"table {name} of {side}: key columns {', '.join(keys)} repeat, so rows cannot be paired")
    merged = sides[0].merge(sides[1], on=keys, how="outer", suffixes=("_a", "_b"), indicator="only_in")
    paired = merged.only_in == "both"
    differing = {c: paired & _differs(merged[f"{c}_a"], merged[f"{c}_b"], rtol) for c in values}
    shown = [c for c in values if differing[c].any()]
    selected = ~paired
    for column in shown:
        selected |= differing[column]
    rows = merged.loc[selected, keys]
    if not paired.all():
        rows["only_in"] = merged.only_in[selected].astype(str).map({"left_only": "a", "right_only": "b", "both": ""})
    for column in shown:
        pair = merged.loc[selected, [f"{column}_a", f"{column}_b"]]
        rows[list(pair.columns)] = pair
        if _is_numeric(pair.iloc[:, 0]) and _is_numeric(pair.iloc[:, 1]):
            rows[f"{column}_diff"] = pair.iloc[:, 1] - pair.iloc[:, 0]
    return TableDiff(name, keys, rows.reset_index(drop=True), notes)


def compare_runs(results_a: Path, results_b: Path, names: Sequence[str] | None, rtol: float) -> list[TableDiff]:
    """Every named table (default: every table of either run but ``UNCOMPARED``) of both runs; a
    table present in one run only is a difference."""
    present = {side: _table_names(results, COMPARE_HINT) for side, results in (("a", results_a), ("b", results_b))}
    everywhere = present["a"] | present["b"]
    for name in names or ():
        if name not in everywhere:
            available = ", ".join(sorted(everywhere))
            raise InputError(f"no table {name} in {results_a} or {results_b}; available: {available}")
    diffs = []
    for name in names or sorted(everywhere - set(UNCOMPARED)):
        missing = [side for side in "ab" if name not in present[side]]
        if missing:
            only = "b" if missing == ["a"] else "a"
            diffs.append(TableDiff(name, [], pd.DataFrame(), [f"table only in {only}"]))
        else:
            frames = (_read_table(results, name, COMPARE_HINT) for results in (results_a, results_b))
            diffs.append(compare_tables(name, *frames, rtol=rtol))
    return diffs


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def verdict(diffs: Sequence[TableDiff]) -> str:
    """One line: "identical (K tables)" or "N differences in M tables (of K)"."""
    differing = [d for d in diffs if d.count]
    if not differing:
        return f"identical ({_counted(len(diffs), 'table')})"
    total = sum(d.count for d in differing)
    return f"{_counted(total, 'difference')} in {_counted(len(differing), 'table')} (of {len(diffs)})"


def _json_records(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: Python numbers, missing values null."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def print_comparison(diffs: Sequence[TableDiff], results_a: Path, results_b: Path, rtol: float, fmt: str) -> None:
    """The verdict first, then the differing rows of each table that differs."""
    summary = verdict(diffs)
    differing = [d for d in diffs if d.count]
    if fmt == "json":
        report = {
            "verdict": summary, "identical": not differing, "differences": sum(d.count for d in differing),
            "a": str(results_a), "b": str(results_b), "rtol": rtol,
            "tables": [
                {"table": d.name, "keys": d.keys, "notes": d.notes, "rows": _json_records(d.rows)} for d in differing
            ],
        }
        print(json.dumps(report, indent=2, default=lambda value: value.item()))
        return
    sides = f"a: {results_a}, b: {results_b}, rtol: {rtol:g}"
    if fmt == "markdown":
        print(f"{summary}\n\n{sides}")
        for diff in differing:
            notes = "".join(f"- {note}\n" for note in diff.notes)
            print(f"\n### {diff.name}\n\n{notes}" + (formats.markdown(diff.rows) if len(diff.rows) else ""), end="")
        return
    console = _console()
    console.print(f"{summary}\n{sides}")
    for diff in differing:
        console.print()
        for note in diff.notes:
            console.print(f"{diff.name}: {note}")
        if len(diff.rows):
            print_table(diff.rows, f"{diff.name}: {_counted(len(diff.rows), 'differing row')}", diff.keys, console)


# --- the command ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="actsparse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("list", help="the jobs a config would run now (a Snakemake dry run)")
    plan.add_argument("--configfile", nargs="+", default=[], help="config files, later ones overriding earlier "
                      "ones (default: config/config.yaml)")
    check = commands.add_parser("check", help="check config files as the workflow will, without Snakemake "
                                "(a YAML syntax error names its file and line)")
    check.add_argument("configfile", nargs="*", help="config files, later ones overriding earlier ones key by key "
                       "(default: config/config.yaml)")
    show = commands.add_parser("show", help="print a result table, e.g. perplexity or perplexity_wide")
    show.add_argument("table")
    show.add_argument("--results", type=Path, default=Path("results"), help="the results directory (default: results)")
    show.add_argument("--format", choices=["terminal", *SHOW_FORMATS], default="terminal")
    compare = commands.add_parser(
        "compare", help="the tables of two result directories, row by row on their key columns",
        description="Prints a verdict line, then the rows that differ. Exit status 0: identical; 1: different; "
        "2: usage error or missing results.",
    )
    compare.add_argument("results_a", type=Path, help="a results directory (holding tables/*.csv): the a side")
    compare.add_argument("results_b", type=Path, help="another results directory: the b side")
    compare.add_argument("--table", action="append", help="a table to compare (repeatable; default: every table "
                         f"of either run but {', '.join(UNCOMPARED)})")
    compare.add_argument("--rtol", type=float, default=0.0, help="numbers within this fraction of the larger "
                         "magnitude are equal (default 0: exactly equal, as a rerun writes them)")
    compare.add_argument("--format", choices=COMPARE_FORMATS, default="text")
    args, extra = parser.parse_known_args(argv)

    if args.command == "list":
        return _snakemake_plan(args.configfile, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "check":
        return _check(args.configfile)
    try:
        return _show(args) if args.command == "show" else _compare(args)
    except InputError as error:
        (show if args.command == "show" else compare).error(str(error))  # exits with status 2


def _show(args: argparse.Namespace) -> int:
    frame = _read_table(args.results, args.table, SHOW_HINT)
    if args.format == "terminal":
        print_table(frame, f"{args.results}/tables/{args.table}.csv", table_keys(args.table, frame), _console())
    else:
        print(SHOW_FORMATS[args.format](frame), end="")
    return 0


def _compare(args: argparse.Namespace) -> int:
    if args.rtol < 0:
        raise InputError(f"--rtol must be >= 0, not {args.rtol:g}")
    diffs = compare_runs(args.results_a, args.results_b, args.table, args.rtol)
    print_comparison(diffs, args.results_a, args.results_b, args.rtol, args.format)
    return 1 if any(d.count for d in diffs) else 0


if __name__ == "__main__":
    sys.exit(main())
