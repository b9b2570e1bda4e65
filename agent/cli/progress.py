"""The live view of a running task: a rich progress bar on a terminal, plain lines elsewhere.

Both show the same ``ProgressState``, which ``ProgressClamp`` keeps from moving backwards even if the agent
sent a lower value (it should not; a bar that jumps back looks like data loss to whoever watches it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column

from agent.client import TaskView

from .output import Output, human_bytes, human_duration, human_rate, number


@dataclass(frozen=True)
class ProgressState:
    state: str
    phase: str | None
    percent: float
    bytes_done: float | None
    bytes_total: float | None
    rate: float | None
    eta: float | None

    @property
    def label(self) -> str:
        if self.phase and self.phase.upper() != self.state:
            return f"{self.state} · {self.phase}"
        return self.state

    @property
    def amount(self) -> str:
        if self.bytes_total is None:
            return human_bytes(self.bytes_done)
        return f"{human_bytes(self.bytes_done)} / {human_bytes(self.bytes_total)}"

    def line(self) -> str:
        return (
            f"{self.label}  {self.percent:5.1f}%  {self.amount}  {human_rate(self.rate)}"
            f"  ETA {human_duration(self.eta)}"
        )


class ProgressClamp:
    """Turns task snapshots into display states whose percent and bytes done never decrease."""

    def __init__(self) -> None:
        self._percent = 0.0
        self._done: float | None = None

    def apply(self, task: TaskView) -> ProgressState:
        progress = task.get("progress") or {}
        state = str(task.get("state") or "?")
        percent = number(progress.get("percent"))
        if percent is not None:
            self._percent = max(self._percent, min(100.0, percent))
        if state == "SUCCEEDED":
            self._percent = 100.0
        done = number(progress.get("bytesDone"))
        if done is not None:
            self._done = done if self._done is None else max(self._done, done)
        phase = task.get("phase")
        return ProgressState(
            state=state,
            phase=str(phase) if phase else None,
            percent=self._percent,
            bytes_done=self._done,
            bytes_total=number(progress.get("bytesTotal")),
            rate=number(progress.get("bytesPerSecond")),
            eta=None if state in ("SUCCEEDED", "FAILED", "CANCELLED") else number(progress.get("etaSeconds")),
        )


class ProgressView(Protocol):
    def update(self, task: TaskView) -> None: ...

    def close(self) -> None: ...


class NoProgressView:
    """For ``--json``: stdout is for the final JSON only."""

    def update(self, task: TaskView) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgressView:
    """Off a terminal (logs, CI): one plain line at most every ``interval`` seconds, so logs stay small."""

    def __init__(
        self, out: Output, *, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._out = out
        self._interval = interval
        self._clock = clock
        self._clamp = ProgressClamp()
        self._last_at: float | None = None

    def update(self, task: TaskView) -> None:
        state = self._clamp.apply(task)
        now = self._clock()
        if self._last_at is not None and now - self._last_at < self._interval:
            return
        self._last_at = now
        self._out.line(state.line())

    def close(self) -> None:
        pass


def rich_bars(out: Output, label_width: int) -> Progress:
    """The bars every live view draws: label (a fixed width keeps a bar from jumping sideways when its
    label changes), bar, percent, amount, rate, ETA."""
    return Progress(
        TextColumn(
            "{task.fields[label]}", markup=False, table_column=Column(width=label_width, no_wrap=True)
        ),
        BarColumn(bar_width=None),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[amount]}", markup=False),
        TextColumn("{task.fields[rate]}", markup=False),
        TextColumn("ETA {task.fields[eta]}", markup=False),
        console=out.console,
        refresh_per_second=4,
    )


class RichProgressView:
    """On a terminal: a bar redrawn in place; it stays on screen when done, above the summary."""

    def __init__(self, out: Output) -> None:
        self._clamp = ProgressClamp()
        self._progress = rich_bars(out, label_width=24)
        self._task: TaskID | None = None

    def update(self, task: TaskView) -> None:
        state = self._clamp.apply(task)
        if self._task is None:
            # The columns read these fields, so they exist before the refresh thread's first draw.
            self._task = self._progress.add_task("", total=100.0, label="", amount="", rate="", eta="")
            self._progress.start()
        self._progress.update(
            self._task,
            completed=state.percent,
            label=state.label,
            amount=state.amount,
            rate=human_rate(state.rate),
            eta=human_duration(state.eta),
        )

    def close(self) -> None:
        if self._task is not None:
            self._progress.refresh()
        self._progress.stop()


def make_progress_view(out: Output) -> ProgressView:
    if out.json_mode:
        return NoProgressView()
    if out.interactive:
        return RichProgressView(out)
    return LineProgressView(out)
