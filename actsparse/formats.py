"""How a result table looks outside its CSV: Markdown, LaTeX (booktabs) and a standalone HTML view,
written beside the CSV with a provenance sidecar.

The CSV stays the source of truth; these renderings are for reading and pasting. All three show
the same cells (``cells``: four significant digits, missing values blank), so a number in the
paper's LaTeX is the number in the report. The HTML view (the report's) writes byte counts in
MB/GB and shares as percentages (``human_cell``) and shows at most ``HTML_ROWS`` rows, so every
view stays far below the 2 MB a browser accepts in the report's ``data:`` URLs. Plain pandas only
(``to_markdown`` uses tabulate and ``to_latex`` jinja2, both dependencies of snakemake), so
rendering a table starts fast.
"""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path

import pandas as pd

from actsparse.provenance import write_json, write_text

RIGHT_ALIGNED_KINDS = "iuf"  # integer, unsigned and float columns
HTML_ROWS = 300  # rows an HTML view shows; the CSV beside it has them all
# columns the HTML view shows in human units: a byte count, or a share of 1 shown in percent
BYTES = re.compile(r"(^|_)bytes($|_)")
SHARE = re.compile(r"(sparsity|_share|_fraction|_ffn_params)$")


def cell(value: object) -> str:
    """Four significant digits; from 1e4 on without an exponent (perplexities and parameter counts
    read better whole); missing values blank."""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def cells(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as the strings every rendering shows."""
    return frame.astype(object).map(cell)


def human_bytes(value: float) -> str:
    """A byte count in decimal units, three significant digits: ``21.7 GB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def human_cell(column: str, value: object) -> str:
    """``cell`` in the unit a reader expects: bytes in MB/GB, shares of 1 in percent."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        if BYTES.search(column):
            return human_bytes(value)
        if SHARE.search(column):
            return f"{100 * value:.4g}%"
    return cell(value)


def human_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as the HTML view shows it (``human_cell`` per column)."""
    shown = frame.astype(object)
    return pd.DataFrame({c: [human_cell(str(c), v) for v in shown[c]] for c in shown.columns}, index=frame.index)


def _numeric(frame: pd.DataFrame) -> list[bool]:
    return [frame[c].dtype.kind in RIGHT_ALIGNED_KINDS for c in frame.columns]


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    align = ["right" if numeric else "left" for numeric in _numeric(frame)]
    return cells(frame).to_markdown(index=False, disable_numparse=True, colalign=align) + "\n"


def latex(frame: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (\\toprule, \\midrule, \\bottomrule) with LaTeX's special characters
    escaped, ready for ``\\input`` inside a table float (which carries the caption)."""
    spec = "".join("r" if numeric else "l" for numeric in _numeric(frame))
    return cells(frame).to_latex(index=False, escape=True, column_format=spec)


def html_view(frame: pd.DataFrame, title: str, about: str, provenance: dict, body: str | None = None) -> str:
    """A self-contained HTML page: the table (``body``: another view of it) and, folded, the
    provenance of the job that wrote it (the Snakemake report shows it inline). Wide tables
    scroll sideways inside their box, their header and first column stay in view."""
    facts = {key: provenance[key] for key in ("config_hash", "code_version", "device", "seed", "python")}
    packages = ", ".join(f"{name} {version}" for name, version in provenance["packages"].items())
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(about)}</p>\n"
        f"{table_view(frame) if body is None else body}\n"
        f"<details><summary>Provenance of this view</summary>\n<table class=\"provenance\">{rows}"
        f"<tr><th>packages</th><td>{html.escape(packages)}</td></tr></table></details>\n</body></html>\n"
    )


def table_view(frame: pd.DataFrame, limit: int = HTML_ROWS) -> str:
    """The table in human units, its first ``limit`` rows and a note saying so when it has more."""
    align = ["num" if numeric else "text" for numeric in _numeric(frame)]
    head = "".join(f'<th class="{a}">{html.escape(str(c))}</th>' for a, c in zip(align, frame.columns))
    body = "".join(
        "<tr>" + "".join(f'<td class="{a}">{html.escape(v)}</td>' for a, v in zip(align, row)) + "</tr>\n"
        for row in human_cells(frame.head(limit)).itertuples(index=False)
    )
    note = f"<p class=\"note\">First {limit} of {len(frame)} rows; the CSV beside this view has them all.</p>\n"
    return (f"{note if len(frame) > limit else ''}<div class=\"scroll\"><table class=\"data\">"
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table></div>")


_STYLE = (
    "body{font-family:sans-serif;font-size:13px;margin:1em}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "th,td{padding:2px 8px;border-bottom:1px solid #ddd;white-space:nowrap}"
    ".scroll{overflow:auto;max-width:100%;max-height:80vh}"
    ".data thead th{position:sticky;top:0;background:#f4f4f4}"
    ".data td:first-child{position:sticky;left:0;background:#fff}"
    ".num{text-align:right}.text{text-align:left}.note{color:#555}"
    ".provenance th{text-align:left}"
)


def write(
    frame: pd.DataFrame, csv: Path, out, title: str, about: str, provenance: dict, body: str | None = None
) -> None:
    """Every rendering of the table stored in ``csv``, and its sidecar: the provenance of this job
    and the SHA-256 of the CSV the renderings show. ``out``: the rule's named outputs ``md``,
    ``tex``, ``html`` and ``provenance``; ``body``: the HTML view's own layout of the table."""
    write_text(out.md, markdown(frame))
    write_text(out.tex, latex(frame))
    write_text(out.html, html_view(frame, title, about, provenance, body))
    digest = hashlib.sha256(Path(csv).read_bytes()).hexdigest()
    write_json(out.provenance, {"rows": len(frame), "csv_sha256": digest, "provenance": provenance})

