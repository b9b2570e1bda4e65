"""One storage-migration task in memory: its state, history, progress, facts and result, and its public view.

The manager (``agent.tasks.manager``) is the only writer; it journals a change first and then applies it here
with the ``apply_*`` methods, which also wake whoever waits for a change (server-sent events, reporters).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.migration.limits import LiveLimits
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState
from agent.tasks.progress import ProgressTracker


@dataclass(frozen=True)
class StateChange:
    """One entry of a task's history: the state it entered, when (wall clock), and the engine's detail."""

    state: TaskState
    at: float
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "at": iso_time(self.at), "detail": self.detail}


@dataclass
class CurrentTuning:
    """The tuning in force: the request's, then each PATCH's (``migration.request.Tuning`` is a PATCH's body).
    Bandwidth in MiB/s (None = uncapped), downtime in ms."""

    bandwidth_mib: int | None
    downtime_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth_mib, "downTime": self.downtime_ms}


@dataclass
class Task:
    """The in-memory task; ``view()`` is the JSON the API and reports show."""

    uuid: str
    vm_uuid: str
    request: MigrationRequest
    created_at: float
    history: list[StateChange]
    tuning: CurrentTuning
    updated_at: float = 0.0
    phase: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    inventory: dict[str, Any] | None = None
    downtime_ms: int | None = None
    resume_data: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    tracker: ProgressTracker = field(default_factory=ProgressTracker)
    cancel_requested: bool = False
    queue: dict[str, Any] | None = None  # while QUEUED: position and reason (``TaskManager``), not journalled
    tuning_generation: int = 0
    #: The running migration's limits while its streams exist (``ctx.attach_limits``): a PATCH applies there.
    live_limits: LiveLimits | None = field(default=None, repr=False)
    #: Its share of the host-wide budget while it runs (``HostBudget``), bytes/s; None: no host budget.
    host_share: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _retuned: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @classmethod
    def new(cls, task_uuid: str, vm_uuid: str, request: MigrationRequest, now: float | None = None) -> Task:
        at = time.time() if now is None else now
        return cls(
            uuid=task_uuid,
            vm_uuid=vm_uuid,
            request=request,
            created_at=at,
            updated_at=at,
            history=[StateChange(TaskState.PENDING, at)],
            tuning=CurrentTuning(request.migrateVm.bandwidth, request.migrateVm.downTime),
        )

    @property
    def state(self) -> TaskState:
        return self.history[-1].state

    @property
    def state_sequence(self) -> list[TaskState]:
        return [change.state for change in self.history]

    # -- changes (called by the manager after the journal has the change) --------------------------------

    def apply_state(self, change: StateChange) -> None:
        self.history.append(change)
        self.phase = change.detail or change.state.value.lower()
        if self.started_at is None and not change.state.waiting and not change.state.final:
            self.started_at = change.at
        if change.state.final:
            self.finished_at = change.at
            self._finished.set()
        self.touch(change.at)

    def apply_phase(self, detail: str, now: float) -> None:
        self.phase = detail
        self.touch(now)

    def apply_tuning(self, bandwidth_mib: int | None, downtime_ms: int | None, now: float) -> None:
        """A retune: None leaves a value as it is; bandwidth 0 lifts the cap (stored as None)."""
        if bandwidth_mib is not None:
            self.tuning.bandwidth_mib = bandwidth_mib or None
        if downtime_ms is not None:
            self.tuning.downtime_ms = downtime_ms
        self.tuning_generation += 1
        retuned, self._retuned = self._retuned, asyncio.Event()
        retuned.set()
        self.touch(now)

    def apply_queue(self, queue: dict[str, Any] | None) -> None:
        """Where the task stands in the queue (None: it does not wait); wakes the watchers when it moved."""
        if queue != self.queue:
            self.queue = queue
            self.touch()

    def touch(self, now: float | None = None) -> None:
        """Mark the view changed: wakes every ``wait_changed`` caller (no queue, latest view wins)."""
        self.updated_at = time.time() if now is None else now
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- waiting -------------------------------------------------------------------------------------------

    def change_waiter(self) -> asyncio.Event:
        """The event the next change sets; take it *before* reading the view so no change is missed."""
        return self._changed

    async def wait_retuned(self) -> None:
        await self._retuned.wait()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    # -- views ---------------------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """The task as the API shows it (never the destination token)."""
        snapshot = self.tracker.snapshot()
        return {
            "taskUuid": self.uuid,
            "vmUuid": self.vm_uuid,
            "state": self.state.value,
            "phase": self.phase,
            "states": [change.to_json() for change in self.history],
            "progress": snapshot.to_json(),
            "volumes": [item.to_json() for item in snapshot.items],
            "details": dict(self.details),
            "downtimeMs": self.downtime_ms,
            "error": self.error,
            "inventory": self.inventory,
            "tuning": self.tuning.to_json(),
            "queue": self.queue,
            "createdAt": iso_time(self.created_at),
            "updatedAt": iso_time(self.updated_at),
            "request": request_summary(self.request),
        }

    def progress_report(self) -> dict[str, Any]:
        """The body of a progress POST to the management plane: small, the latest state and numbers."""
        return {
            "taskUuid": self.uuid,
            "vmUuid": self.vm_uuid,
            "state": self.state.value,
            "phase": self.phase,
            "progress": self.tracker.snapshot().to_json(),
        }


def request_summary(request: MigrationRequest) -> dict[str, Any]:
    """The request as shown in views: everything but the destination agent's token."""
    return request.model_dump(mode="json", exclude={"dstHost": {"token"}})


def iso_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
