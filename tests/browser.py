"""A real headless Chromium (Debian's ``chromium``) reading a Snakemake report as a reader's browser
does, driven over the DevTools protocol on a pipe, so no dependency beyond the browser itself.

``shown_results`` opens the report, then loads every result the way the report's viewer does (an
``iframe`` or ``img`` whose ``src`` is the result's ``data:`` URL) and says what each one shows:
table cells and text of an HTML view, pixel size and share of non-white pixels of a figure. A view
over the browser's URL limit comes back empty, as a reader would see it.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# the flags of a quiet, offline, throwaway browser
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe",
)
TIMEOUT_S = 60.0


def executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Shown:
    """What one result of the report shows in the browser."""

    path: str
    kind: str  # "html" or "image"
    labels: dict | None
    cells: int = 0  # non-empty table cells of an HTML view
    text: int = 0  # characters of visible text of an HTML view
    width: int = 0  # pixels of a figure
    inked: float = 0.0  # share of a figure's pixels that are not white (a one-line text is 0.5%)

    @property
    def blank(self) -> bool:
        return self.cells == 0 if self.kind == "html" else self.width == 0 or self.inked < 0.001


class DevTools:
    """The DevTools protocol over ``--remote-debugging-pipe``: JSON messages ending in NUL, the
    browser reading commands on its fd 3 and answering on its fd 4."""

    def __init__(self, binary: str, profile: Path):
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()

        def wire():  # the browser's fds 3 and 4, by way of fresh copies should the pipes be 3 or 4 already
            reads, writes = os.dup(to_browser), os.dup(from_browser)
            os.dup2(reads, 3)
            os.dup2(writes, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=wire, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def _read(self) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._answers], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._answers, 1 << 20) if ready else b""
            if not chunk:
                raise RuntimeError("the browser stopped answering")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._commands)
        os.close(self._answers)


class Page:
    """One tab of the browser."""

    def __init__(self, tools: DevTools):
        self.tools = tools
        target = tools.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")

    def call(self, method: str, **params) -> dict:
        return self.tools.call(method, self.session, **params)

    def evaluate(self, expression: str, context: int | None = None):
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context is not None:
            params["contextId"] = context
        answer = self.call("Runtime.evaluate", **params)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression[:80]}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(expression)
            time.sleep(0.2)

    def in_frame(self, frame_id: str, expression: str):
        """``expression`` evaluated in a child frame (its own world, so a ``data:`` frame too)."""
        context = self.call("Page.createIsolatedWorld", frameId=frame_id)["executionContextId"]
        return self.evaluate(expression, context)


# every result as the viewer loads it: an iframe per HTML view, an img per figure
LOAD_EVERY_RESULT = """
(async () => {
  const loads = [];
  for (const [path, result] of Object.entries(results)) {
    const html = result.mime_type === "text/html";
    if (!html && !result.mime_type.startsWith("image/")) continue;
    const node = document.createElement(html ? "iframe" : "img");
    node.className = "probe";
    node.dataset.path = path;
    if (html) node.name = path;
    loads.push(new Promise(done => { node.onload = done; node.onerror = done; setTimeout(done, 20000); }));
    node.src = result.data_uri;
    document.body.appendChild(node);
  }
  await Promise.all(loads);
  return loads.length;
})()
"""
# per figure: its size and share of non-white pixels (data: images do not taint a canvas)
MEASURE_IMAGES = """
[...document.querySelectorAll("img.probe")].map(img => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  if (!img.naturalWidth) return [img.dataset.path, 0, 0];
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let inked = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    if (pixels[i + 3] > 0 && (pixels[i] < 240 || pixels[i + 1] < 240 || pixels[i + 2] < 240)) inked++;
  }
  return [img.dataset.path, img.naturalWidth, inked / (pixels.length / 4)];
})
"""
MEASURE_VIEW = """
[[...document.querySelectorAll("table:not(.provenance) td")].filter(td => td.textContent.trim()).length,
 (document.body ? document.body.innerText.trim().length : 0)]
"""


def shown_results(report: Path, binary: str) -> list[Shown]:
    """Every HTML view and figure of ``report`` as the browser shows it."""
    # the killed browser's helper processes may still write to the profile while it is removed
    with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
        tools = DevTools(binary, Path(profile))
        try:
            return _shown(Page(tools), Path(report))
        finally:
            tools.close()


def _shown(page: Page, report: Path) -> list[Shown]:
    page.call("Page.navigate", url=report.resolve().as_uri())
    page.wait_for("document.readyState === 'complete' && typeof results === 'object'")
    page.evaluate(LOAD_EVERY_RESULT)
    labels = page.evaluate("Object.fromEntries(Object.entries(results).map(([p, r]) => [p, r.labels]))")
    shown = [Shown(path, "image", labels[path], width=width, inked=inked)
             for path, width, inked in page.evaluate(MEASURE_IMAGES)]
    for child in page.call("Page.getFrameTree")["frameTree"].get("childFrames", []):
        frame = child["frame"]
        cells, text = page.in_frame(frame["id"], MEASURE_VIEW)
        shown.append(Shown(frame["name"], "html", labels[frame["name"]], cells=cells, text=text))
    return shown
