"""Journal first, then announce: the one path by which a task's state, facts and result change.

``TaskRecorder`` writes each change to the journal, applies it to the in-memory ``Task`` only once the write
is durable (``commit``), logs one line, and tells the listeners. The manager (scheduling, cancel, limits) and
the engines (through ``RunContext``) both change tasks only through it. Callers hold ``task.lock`` for the
``*_locked`` methods; the others take it themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent.errors import AgentError, Code, Conflict, MigrationFailed
from agent.migration.states import TaskState, can_transition
from agent.tasks.hooks import ChangeKind, TaskChange, TaskListener
from agent.tasks.journal import Journal
from agent.tasks.records import callback_body, final_view, progress_json
from agent.tasks.task import StateChange, Task

log = logging.getLogger(__name__)


class InvalidTransition(Conflict):
    """A task was asked to move to a state its current state does not allow."""

    code = Code.INVALID_TRANSITION


def cancelled_error() -> AgentError:
    return AgentError(
        "the migration was cancelled on request; the VM keeps its source volumes", code=Code.CANCELLED
    )


class TaskRecorder:
    """Records and announces task changes (see the module docstring)."""

    def __init__(
        self,
        journal: Journal,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self._clock = clock
        self._monotonic = monotonic
        self._listeners: list[TaskListener] = []

    def add_listener(self, listener: TaskListener) -> None:
        self._listeners.append(listener)

    def now(self) -> float:
        return self._clock()

    async def save_tuning(self, task: Task, bandwidth: int | None, downtime: int | None) -> None:
        """Journal a retune, then apply it (waking ``ctx.tuning_changed()``); caller holds ``task.lock``.

        None leaves a value as it is; ``bandwidth`` 0 lifts the cap (journalled and kept as None).
        """
        merged_bandwidth = (bandwidth or None) if bandwidth is not None else task.tuning.bandwidth_mib
        merged_downtime = downtime if downtime is not None else task.tuning.downtime_ms
        now = self._clock()
        await self.commit(
            self.journal.save_tuning(
                task.uuid, {"bandwidth": merged_bandwidth, "downTime": merged_downtime}, now
            ),
            lambda: task.apply_tuning(bandwidth, downtime, now),
        )
        log.info(
            "task=%s vm=%s: retuned to bandwidth %s MiB/s, downtime %s ms",
            task.uuid,
            task.vm_uuid,
            merged_bandwidth,
            merged_downtime,
        )
        self.notify(task, TaskChange(ChangeKind.TUNING))

    async def enter_state(self, task: Task, state: TaskState, detail: str | None) -> None:
        if state.final:
            raise InvalidTransition(f"an engine does not enter {state}: it returns or raises instead")
        async with task.lock:
            if state is task.state:
                task.apply_phase(detail or state.value.lower(), self._clock())
                self.notify(task, TaskChange(ChangeKind.PHASE))
                return
            if task.state is TaskState.CANCELLING:
                # The cancel is on its way to this engine (engine.cancel() follows the CANCELLING commit):
                # let it arrive here instead of announcing a step that will not happen.
                await asyncio.sleep(0)
            if not can_transition(task.state, state):
                raise InvalidTransition(f"task {task.uuid} cannot go from {task.state} to {state}")
            await self.transition_locked(task, state, detail)

    async def checkpoint(self, task: Task, data: Mapping[str, Any]) -> None:
        saved = _json_copy(data, "checkpoint data")
        async with task.lock:
            await self.commit(
                self.journal.save_checkpoint(
                    task.uuid, saved, self._clock(), _json_copy(task.details), progress_json(task)
                ),
                lambda: setattr(task, "resume_data", saved),
            )

    def report_progress(self, task: Task, item: str, done: int, total: int) -> None:
        moved = task.tracker.update(item, done, total, self._monotonic())
        task.touch(self._clock())
        self.notify(task, TaskChange(ChangeKind.PROGRESS, moved))

    def note(self, task: Task, key: str, value: Any) -> None:
        """A fact for the view; kept in memory and journalled with the next state, checkpoint or result."""
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        task.details[key] = value
        if key == "downtimeMs" and isinstance(value, int | float):
            task.downtime_ms = int(value)
        task.touch(self._clock())
        self.notify(task, TaskChange(ChangeKind.DETAILS))

    async def commit(self, write: Awaitable[None], apply: Callable[[], None]) -> None:
        """Run ``write`` (a journal call), then ``apply`` the change in memory once it is durable.

        The write is shielded and ``apply`` runs from its done-callback, so a caller cancelled meanwhile
        cannot leave memory and journal disagreeing.
        """
        future = asyncio.ensure_future(write)

        def applied(done: asyncio.Future[None]) -> None:
            if done.cancelled():
                return
            err = done.exception()
            if err is None:
                apply()
            else:
                log.error("journal write failed: %s", err)

        future.add_done_callback(applied)
        await asyncio.shield(future)

    async def transition_locked(self, task: Task, state: TaskState, detail: str | None) -> None:
        previous = task.state
        change = StateChange(state, self._clock(), detail)
        await self.commit(
            self.journal.record_state(
                task.uuid,
                state,
                detail,
                change.at,
                progress=progress_json(task),
                details=_json_copy(task.details),
            ),
            lambda: task.apply_state(change),
        )
        log.info(
            "task=%s vm=%s: %s -> %s%s",
            task.uuid,
            task.vm_uuid,
            previous,
            state,
            f" ({detail})" if detail else "",
        )
        self.notify(task, TaskChange(ChangeKind.STATE))

    async def finish(
        self,
        task: Task,
        state: TaskState,
        detail: str | None,
        *,
        error: AgentError | None = None,
        inventory: dict[str, Any] | None = None,
        lock_held: bool = False,
    ) -> None:
        """Record the task's final state and queue its callback; ``lock_held``: the caller holds ``task.lock``
        already (a cancel that ends a task still waiting for its slot)."""
        async with contextlib.nullcontext() if lock_held else task.lock:
            if task.state.final:
                return
            if not can_transition(task.state, state):
                log.error(
                    "task=%s vm=%s: %s -> %s is not allowed; recording FAILED",
                    task.uuid,
                    task.vm_uuid,
                    task.state,
                    state,
                )
                error = InvalidTransition(f"engine ended in {state} from {task.state}")
                state, inventory = TaskState.FAILED, None
            change = StateChange(state, self._clock(), detail)
            view = final_view(task, change, error, inventory)
            callback = None
            if task.request.callbackUrl:
                callback = (task.request.callbackUrl, json.dumps(callback_body(task, view)))

            def apply() -> None:
                task.error = view["error"]
                task.inventory = inventory
                if state is TaskState.SUCCEEDED:
                    task.tracker.mark_complete()
                task.apply_state(change)

            progress = progress_json(task)
            if state is TaskState.SUCCEEDED:
                progress["percent"] = 100.0
            try:
                await self.commit(
                    self.journal.finish_task(
                        task.uuid, state, detail, change.at, result=view, progress=progress, callback=callback
                    ),
                    apply,
                )
            except AgentError:
                # The result could not be made durable: still show the truth, and say loudly what is lost.
                log.exception(
                    "task=%s vm=%s: could not journal the final state %s; the callback is lost",
                    task.uuid,
                    task.vm_uuid,
                    state,
                )
                apply()
            elapsed = change.at - (task.started_at or task.created_at)
            if error is None:
                log.info("task=%s vm=%s: %s after %.1f s", task.uuid, task.vm_uuid, state, elapsed)
            else:
                log.warning(
                    "task=%s vm=%s: %s after %.1f s: %s: %s",
                    task.uuid,
                    task.vm_uuid,
                    state,
                    elapsed,
                    error.code,
                    error.description,
                )
            self.notify(task, TaskChange(ChangeKind.STATE))
            self.notify(task, TaskChange(ChangeKind.FINISHED))

    def notify(self, task: Task, change: TaskChange) -> None:
        for listener in self._listeners:
            try:
                listener(task, change)
            except Exception:
                log.exception(
                    "task=%s vm=%s: a task listener failed on %s", task.uuid, task.vm_uuid, change.kind
                )


def _json_copy(data: Mapping[str, Any], what: str = "details") -> dict[str, Any]:
    try:
        copied: dict[str, Any] = json.loads(json.dumps(dict(data)))
    except (TypeError, ValueError) as err:
        raise MigrationFailed(f"{what} cannot be stored as JSON", details=str(err)) from err
    return copied
