"""The task engine's seams: how it gets an engine for a task, and how others hear about task changes.

``EngineFactory`` is called once per run of a task, when the task gets a slot: ``factory(request, vm_uuid,
resume)`` returns an ``Engine`` (``agent.migration.engine``); ``resume`` is True when the task was found
unfinished in the journal at start (the engine continues from ``ctx.resume_data`` or fails cleanly). A factory
that raises fails the task with that error.

Listeners (metrics, reports) are plain callables ``(task, change)``; they run on the loop, must be quick and
should not raise (the manager logs and ignores what they raise: a listener never breaks a task).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.errors import Code, MigrationFailed
from agent.migration.engine import Engine, EngineFactory, TaskContext
from agent.migration.request import MigrationRequest

if TYPE_CHECKING:
    from agent.tasks.task import Task


class ChangeKind(enum.StrEnum):
    CREATED = "created"
    STATE = "state"
    PHASE = "phase"
    PROGRESS = "progress"
    DETAILS = "details"
    TUNING = "tuning"
    FINISHED = "finished"


@dataclass(frozen=True)
class TaskChange:
    """What changed; ``bytes_moved`` counts the bytes a PROGRESS report added (for the metrics)."""

    kind: ChangeKind
    bytes_moved: int = 0


TaskListener = Callable[["Task", TaskChange], None]


class EngineUnavailable:
    """The engine a factory hands out when no real engine can be built: every run fails with the reason."""

    name = "unavailable"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        raise MigrationFailed(
            "migration engine not available", details=self.reason, code=Code.ENGINE_UNAVAILABLE
        )


def unavailable_engine_factory(reason: str) -> EngineFactory:
    """A factory whose engines fail every task with ``AGENT.ENGINE_UNAVAILABLE`` and ``reason``."""

    def factory(request: MigrationRequest, vm_uuid: str, resume: bool) -> Engine:
        return EngineUnavailable(reason)

    return factory
