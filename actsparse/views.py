"""How a table looks in its HTML view (the report's) when the table itself is not the best view,
and the rendering of a table into every format with its own view. Pandas only, so a rendering job
starts fast.

``VIEWS`` names the tables with their own view: the provenance table (what every file shares once,
then only the differences) and the downstream table (each accuracy's standard error and document
count beside it).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from actsparse import columns, formats


def provenance_view(rows: pd.DataFrame) -> str:
    """The provenance table read at a glance: what every file shares, once (each package its own
    line), then only the columns in which files differ, per file."""
    packages = rows["packages"].fillna("").map(lambda text: dict(p.split("=", 1) for p in text.split()))
    spread = pd.concat([rows.drop(columns="packages"), pd.DataFrame(packages.tolist(), index=rows.index)], axis=1)
    spread = spread.astype(object).where(spread.notna(), "none")
    varying = [c for c in spread.columns if c != "file" and spread[c].nunique() > 1]
    shared = spread.drop(columns=["file", *varying]).iloc[:1].T.reset_index()
    shared.columns = ["", "every file"]
    listed = spread[["file", *varying]]
    heading = f"Where files differ: {', '.join(map(str, varying))}" if varying else "Every file: no differences"
    return (f"<h3>Shared by all {len(rows)} files</h3>\n{formats.table_view(shared)}\n"
            f"<h3>{html.escape(heading)}</h3>\n{formats.table_view(listed)}")


def downstream_view(frame: pd.DataFrame) -> str:
    """The downstream table with each accuracy's standard error and document count beside it."""
    first = ["model", "method", "target_sparsity", "task", "acc", columns.ACC_STDERR, "n"]
    return formats.table_view(frame[first + [c for c in frame.columns if c not in first]])


VIEWS: dict[str, Callable[[pd.DataFrame], str]] = {"provenance": provenance_view, "downstream": downstream_view}


def render(
    name: str, csv: Path, out, title: str, about: str, provenance: dict, frame: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every rendering of table ``name`` stored in ``csv`` (``frame``: as built, else read from it)
    and its sidecar (``formats.write``), the HTML view in the table's own layout where it has one."""
    frame = pd.read_csv(csv) if frame is None else frame
    view = VIEWS.get(name)
    formats.write(frame, csv, out, title, about, provenance, view and view(frame))
    return frame
