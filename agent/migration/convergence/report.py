"""The convergence part of a task's final report, read from the samples and the actions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agent.migration.convergence.actions import Abort, Action, Note, PauseGuest, SetDowntime, StartPostCopy
from agent.migration.convergence.samples import MigrationSample


def summarise(samples: Iterable[MigrationSample], actions: Iterable[Action] = ()) -> dict[str, Any]:
    """The convergence part of the final report: passes, throttle, downtime allowed, outcome, decisions."""
    iterations = 0
    max_throttle = 0
    postcopy = False
    for sample in samples:
        iterations = max(iterations, sample.memory_iteration)
        max_throttle = max(max_throttle, sample.auto_converge_throttle)
        postcopy = postcopy or sample.postcopy_active
    final_downtime: int | None = None
    paused = False
    aborted: str | None = None
    decisions: list[str] = []
    for action in actions:
        if isinstance(action, SetDowntime):
            final_downtime = action.ms
        elif isinstance(action, StartPostCopy):
            postcopy = True
        elif isinstance(action, PauseGuest):
            paused = True
        elif isinstance(action, Abort):
            aborted = action.error.message
        elif isinstance(action, Note):
            decisions.append(action.message)
    return {
        "iterations": iterations,
        "maxThrottlePct": max_throttle,
        "finalDowntimeMs": final_downtime,
        "postCopy": postcopy,
        "paused": paused,
        "aborted": aborted,
        "decisions": decisions,
    }
