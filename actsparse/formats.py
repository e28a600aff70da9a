"""How a result table looks outside its CSV: Markdown, LaTeX (booktabs) and a standalone HTML view,
written beside the CSV with a provenance sidecar.

The CSV stays the source of truth; these renderings are for reading and pasting. All three show
the same cells (``cells``: four significant digits, missing values blank), so a number in the
paper's LaTeX is the number in the report. Plain pandas only (``to_markdown`` uses tabulate and
``to_latex`` jinja2, both dependencies of snakemake), so rendering a table starts fast.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

import pandas as pd

from actsparse.provenance import write_json, write_text

RIGHT_ALIGNED_KINDS = "iuf"  # integer, unsigned and float columns


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


def html_view(frame: pd.DataFrame, title: str, about: str, provenance: dict) -> str:
    """A self-contained HTML page: the table and the provenance of the job that wrote it (the
    Snakemake report shows it inline)."""
    facts = {key: provenance[key] for key in ("config_hash", "code_version", "device", "seed", "python")}
    packages = ", ".join(f"{name} {version}" for name, version in provenance["packages"].items())
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h2>{html.escape(title)}</h2>\n<p>{html.escape(about)}</p>\n"
        f"{cells(frame).to_html(index=False, border=0)}\n"
        f"<h3>Provenance</h3>\n<table class=\"provenance\">{rows}"
        f"<tr><th>packages</th><td>{html.escape(packages)}</td></tr></table>\n</body></html>\n"
    )


_STYLE = (
    "body{font-family:sans-serif;font-size:14px;margin:1em}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "th,td{padding:2px 8px;border-bottom:1px solid #ddd}"
    ".provenance th{text-align:left}"
)


def write(frame: pd.DataFrame, csv: Path, out, title: str, about: str, provenance: dict) -> None:
    """Every rendering of the table stored in ``csv``, and its sidecar: the provenance of this job
    and the SHA-256 of the CSV the renderings show. ``out``: the rule's named outputs ``md``,
    ``tex``, ``html`` and ``provenance``."""
    write_text(out.md, markdown(frame))
    write_text(out.tex, latex(frame))
    write_text(out.html, html_view(frame, title, about, provenance))
    digest = hashlib.sha256(Path(csv).read_bytes()).hexdigest()
    write_json(out.provenance, {"rows": len(frame), "csv_sha256": digest, "provenance": provenance})


def render(csv: Path, out, title: str, about: str, provenance: dict) -> pd.DataFrame:
    """An earlier rule's table: its CSV in, every rendering and the sidecar out."""
    frame = pd.read_csv(csv)
    write(frame, csv, out, title, about, provenance)
    return frame
