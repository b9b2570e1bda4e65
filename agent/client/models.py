"""Typed views of the agent's JSON answers, as far as clients rely on them.

TypedDicts rather than validating models: the client must keep working when the agent adds fields, and
every key is optional because older or newer agents may leave one out.
"""

from __future__ import annotations

from typing import Any, TypedDict

#: The final task states as the API writes them (``agent.migration.states.TaskState``): the client speaks the
#: wire, not the model (tests/unit/test_layers.py checks the two agree).
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


class ErrorCodeBody(TypedDict, total=False):
    """ZStack's ErrorCode: ``{code, description, details, cause}``, plus ``field`` for bad input."""

    code: str
    description: str
    details: str | None
    cause: ErrorCodeBody | None
    field: str


class Progress(TypedDict, total=False):
    percent: float
    bytesDone: int
    bytesTotal: int
    bytesPerSecond: float
    etaSeconds: float | None


class TaskView(TypedDict, total=False):
    """``GET /v1/tasks/{taskUuid}``; also what the migration POST, PATCH and cancel answer."""

    taskUuid: str
    vmUuid: str
    state: str
    phase: str | None
    progress: Progress
    states: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    tuning: dict[str, Any]
    downtimeMs: float | None
    error: ErrorCodeBody | None
    inventory: Any
    createdAt: str
    updatedAt: str


def is_final(task: TaskView) -> bool:
    """Whether the task reached SUCCEEDED, FAILED or CANCELLED."""
    return task.get("state") in FINAL_STATES
