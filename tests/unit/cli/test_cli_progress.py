"""The progress view: never backwards, at most a line a second off a terminal, a live bar on one."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from agent.cli.output import Output, human_bytes, human_duration, human_rate
from agent.cli.progress import (
    LineProgressView,
    NoProgressView,
    ProgressClamp,
    RichProgressView,
    make_progress_view,
)
from agent.client import TaskView


def snap(state: str, percent: float | None, done: int | None = None, **progress: float) -> TaskView:
    counters: dict[str, float] = dict(progress)
    if percent is not None:
        counters["percent"] = percent
    if done is not None:
        counters["bytesDone"] = done
    return {"taskUuid": "t1", "state": state, "phase": None, "progress": counters}  # type: ignore[typeddict-item]


def test_clamp_never_moves_backwards() -> None:
    clamp = ProgressClamp()
    shown = [
        clamp.apply(snap("COPYING", p, d))
        for p, d in [(10, 100), (50, 500), (30, 300), (None, None), (60, 600)]
    ]
    assert [s.percent for s in shown] == [10, 50, 50, 50, 60]
    assert [s.bytes_done for s in shown] == [100, 500, 500, 500, 600]


def test_clamp_caps_at_100_and_fills_on_success() -> None:
    clamp = ProgressClamp()
    assert clamp.apply(snap("COPYING", 140.0)).percent == 100.0
    clamp = ProgressClamp()
    clamp.apply(snap("COPYING", 97.0))
    final = clamp.apply(snap("SUCCEEDED", 99.0))
    assert final.percent == 100.0
    assert final.eta is None


def test_label_joins_state_and_phase() -> None:
    state = ProgressClamp().apply({"state": "COPYING", "phase": "vdb 3 of 4"})
    assert state.label == "COPYING · vdb 3 of 4"
    assert ProgressClamp().apply({"state": "COPYING", "phase": "copying"}).label == "COPYING"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_once_a_second_and_never_lower() -> None:
    out = Output(io.StringIO(), io.StringIO())
    clock = FakeClock()
    view = LineProgressView(out, clock=clock)
    for at, percent in [(0.0, 10), (0.2, 20), (0.5, 30), (1.1, 25), (1.5, 50), (2.3, 45), (2.9, 70)]:
        clock.now = at
        view.update(snap("COPYING", percent, bytesTotal=1024**3, bytesPerSecond=50 * 1024**2, etaSeconds=75))
    view.close()
    assert isinstance(out.stdout, io.StringIO)
    lines = out.stdout.getvalue().splitlines()
    assert lines == [
        "COPYING   10.0%  - / 1.0 GiB  50.0 MiB/s  ETA 1:15",
        "COPYING   30.0%  - / 1.0 GiB  50.0 MiB/s  ETA 1:15",  # 25 from the agent is shown as 30
        "COPYING   50.0%  - / 1.0 GiB  50.0 MiB/s  ETA 1:15",
    ]


def test_live_bar_on_a_terminal() -> None:
    buffer = io.StringIO()
    out = Output(buffer, io.StringIO())
    out.console = Console(file=buffer, force_terminal=True, width=120)
    view = RichProgressView(out)
    view.update(snap("COPYING", 40.0, 400, bytesTotal=1000))
    view.update(snap("COPYING", 35.0, 350, bytesTotal=1000))
    view.update(snap("SUCCEEDED", 100.0, 1000, bytesTotal=1000))
    view.close()
    text = buffer.getvalue()
    assert "SUCCEEDED" in text
    assert "100.0%" in text
    assert " 35.0%" not in text


def test_view_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(
        make_progress_view(Output(io.StringIO(), io.StringIO(), json_mode=True)), NoProgressView
    )
    assert isinstance(make_progress_view(Output(io.StringIO(), io.StringIO())), LineProgressView)
    terminal = Output(sys.stdout, io.StringIO())
    terminal.console = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(make_progress_view(terminal), RichProgressView)


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_human_bytes(value: float | None, text: str) -> None:
    assert human_bytes(value) == text


def test_human_duration_and_rate() -> None:
    assert human_duration(None) == "-"
    assert human_duration(float("inf")) == "-"
    assert human_duration(59.6) == "1:00"
    assert human_duration(3725) == "1:02:05"
    assert human_rate(100 * 1024**2) == "100.0 MiB/s"
    assert human_rate(None) == "-"
