"""The report in a real headless Chromium: the checker itself, on a synthetic report (the tiny
workflow's own report is read in test_workflow)."""

from __future__ import annotations

import base64
import io
import json
import os

import pandas as pd
import pytest
from matplotlib.figure import Figure

import browser
from actsparse import formats
from actsparse.provenance import provenance


def chromium() -> str:
    """The browser; outside CI a machine without it skips, in CI (``CI`` set) that is a failure."""
    binary = browser.executable()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `apt-get install -y chromium` (CI reads the report with it)")
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    return binary


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};charset=utf8;base64,{base64.b64encode(data).decode()}"


def png(draw: bool) -> bytes:
    figure = Figure(figsize=(3, 2))
    ax = figure.subplots()
    if draw:
        ax.plot([0, 1], [0, 1])
    else:
        ax.set_axis_off()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def view(rows: int) -> bytes:
    """A table view of ``rows`` rows of three cells (its rows written directly: a long one is quick)."""
    row = f"<tr><td>1</td><td>25%</td><td>{'x' * 40}</td></tr>"
    body = f"<table><tr><th>layer</th><th>share</th><th>note</th></tr>{row * rows}</table>"
    return formats.html_view(pd.DataFrame(), "T", "about", provenance(), body=body).encode()


def synthetic_report(path, results: dict) -> None:
    """The parts of a Snakemake report the checker reads: the ``results`` variable."""
    entries = {name: {"mime_type": mime, "data_uri": data_uri(mime, data), "labels": {"name": name}}
               for name, (mime, data) in results.items()}
    path.write_text(f"<!DOCTYPE html><html><body><script>var results = {json.dumps(entries)};</script></body></html>")


def test_the_browser_sees_what_a_reader_sees_and_nothing_over_the_url_limit(tmp_path):
    report = tmp_path / "report.html"
    synthetic_report(report, {
        "small.html": ("text/html", view(3)),
        "huge.html": ("text/html", view(30_000)),  # a multi-megabyte data: URL, as a long table once was
        "figure.png": ("image/png", png(draw=True)),
        "empty.png": ("image/png", png(draw=False)),
    })
    shown = {s.path: s for s in browser.shown_results(report, chromium())}
    assert sorted(shown) == ["empty.png", "figure.png", "huge.html", "small.html"]
    assert shown["small.html"].cells == 9 and not shown["small.html"].blank
    assert shown["huge.html"].blank
    assert shown["figure.png"].width == 300 and not shown["figure.png"].blank
    assert shown["empty.png"].blank
    assert shown["small.html"].labels == {"name": "small.html"}
