"""What the journal hands back (a task and its state history, an outbox entry), and its JSON columns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.migration.states import TaskState


@dataclass(frozen=True)
class StateRow:
    state: TaskState
    detail: str | None
    at: float


@dataclass
class TaskRecord:
    """A task as the journal keeps it; ``result`` is the final view once the task ended."""

    uuid: str
    vm_uuid: str
    request: dict[str, Any]
    state: TaskState
    created_at: float
    updated_at: float
    history: list[StateRow] = field(default_factory=list)
    tuning: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    details: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class OutboxEntry:
    """A final result waiting for delivery to the management plane's ``callbackUrl``."""

    id: int
    task_uuid: str
    url: str
    body: str
    created_at: float
    attempts: int
    next_attempt_at: float


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def opt_dumps(value: Any) -> str | None:
    return None if value is None else dumps(value)


def opt_loads(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}
