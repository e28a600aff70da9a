"""Every result writer goes through provenance.write_bytes: an interrupted write leaves neither
the final file (which would look finished to Snakemake) nor its temporary."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from actsparse import stages  # noqa: E402
from actsparse.provenance import figure_metadata, write_figure, write_json  # noqa: E402
from actsparse.tasks import Doc  # noqa: E402

FRAME = pd.DataFrame({"model": ["m", "m"], "ppl": [12.5, 13.25]})


class Interrupted(BaseException):
    """What a Ctrl-C or a job kill raises mid-write."""


@pytest.fixture
def interrupted_writes(monkeypatch):
    """Every file write stops half way."""
    def half_then_stop(self: Path, data: bytes) -> int:
        with open(self, "wb") as stream:
            stream.write(data[: len(data) // 2])
        raise Interrupted

    monkeypatch.setattr(Path, "write_bytes", half_then_stop)


def figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def writers(tmp_path: Path) -> dict:
    doc = Doc(contexts=("a", "b"), continuations=(" x", " y"), gold=1, norm_lengths=(1, 1))
    return {
        "results.csv": lambda p: stages._write_csv(FRAME, p),
        "result.json": lambda p: write_json(p, {"ppl": 1.0}),
        "task.loglikelihoods.safetensors": lambda p: stages._save_loglikelihoods(p, [doc], [[-1.0, -2.0]]),
        "figure.png": lambda p: write_figure(figure(), p),
        "figure.pdf": lambda p: write_figure(figure(), p),
    }


@pytest.mark.parametrize("name", list(writers(Path())))
def test_an_interrupted_write_leaves_no_file(name, tmp_path, interrupted_writes):
    path = tmp_path / "out" / name
    with pytest.raises(Interrupted):
        writers(tmp_path)[name](path)
    assert list(path.parent.iterdir()) == []


def test_a_finished_write_holds_what_the_direct_writer_writes(tmp_path):
    stages._write_csv(FRAME, tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv").equals(FRAME)
    fig = figure()
    direct = tmp_path / "direct.png"
    fig.savefig(direct, format="png", metadata=figure_metadata(direct))
    write_figure(fig, tmp_path / "atomic.png")
    assert (tmp_path / "atomic.png").read_bytes() == direct.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
