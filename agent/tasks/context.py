"""``RunContext``: the ``TaskContext`` (``agent.migration.engine``) the manager gives an engine for one run.

It is a thin view on the task: every change goes through the ``TaskRecorder``, which journals before it
announces.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from agent.migration.engine import Deadline
from agent.migration.limits import LiveLimits
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState
from agent.tasks.holds import PhaseHolds
from agent.tasks.task import Task
from agent.units import MiB

if TYPE_CHECKING:
    from agent.tasks.recorder import TaskRecorder


_engine_log = logging.getLogger("agent.migration")


class TaskLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the task and VM uuid: ``task=<uuid> vm=<uuid>: message``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"task={extra.get('task_uuid')} vm={extra.get('vm_uuid')}: {msg}", kwargs


class RunContext:
    """The engine's handle on its task (see ``agent.migration.engine.TaskContext`` for the contract)."""

    def __init__(
        self,
        recorder: TaskRecorder,
        task: Task,
        *,
        resumed: bool,
        detaching: Callable[[], bool],
        holds: PhaseHolds | None = None,
    ) -> None:
        self._recorder = recorder
        self._holds = holds or PhaseHolds(None)
        self._detaching = detaching
        self._task = task
        self.task_uuid: str = task.uuid
        self.vm_uuid: str = task.vm_uuid
        self.request: MigrationRequest = task.request
        self.resumed = resumed
        self._tuning_seen = task.tuning_generation
        self.log: logging.LoggerAdapter[logging.Logger] = TaskLogAdapter(
            _engine_log, {"task_uuid": task.uuid, "vm_uuid": task.vm_uuid}
        )

    @property
    def resume_data(self) -> Mapping[str, Any] | None:
        return self._task.resume_data

    @property
    def bandwidth(self) -> int | None:
        mib = self._task.tuning.bandwidth_mib
        return mib * MiB if mib else None  # 0 would be "no cap" too: never a speed of 0

    @property
    def host_share(self) -> int | None:
        return self._task.host_share

    @property
    def downtime_ms(self) -> int:
        return self._task.tuning.downtime_ms

    @property
    def deadline(self) -> Deadline | None:
        timeout = self.request.timeout
        return None if timeout is None else Deadline(self._task.created_at + timeout)

    @property
    def detaching(self) -> bool:
        """True while the agent stops: on ``CancelledError`` leave libvirt jobs running and undo nothing.

        The task stays unfinished in the journal and is handed back with ``resume=True`` at the next start.
        """
        return self._detaching()

    @property
    def cancel_requested(self) -> bool:
        """True once the user asked to cancel (the engine then sees ``CancelledError`` and must undo)."""
        return self._task.cancel_requested

    async def enter(self, state: TaskState, detail: str | None = None) -> None:
        if self.resumed and self._task.state.reached(state):
            # A resumed engine runs again the step it was in when the agent stopped, and that step may
            # enter a state the task reached before (a commit interrupted in VERIFYING announces SWITCHING
            # first): the task stays where it is. Going back would fail a move that succeeded.
            self.log.info("%s: already %s before the restart; staying there", state, self._task.state)
            return
        await self._recorder.enter_state(self._task, state, detail)
        if hold := self._holds.seconds(state):
            self.log.warning(
                "holding in %s for %.1f s (phase-holds.json: a fault test is running)", state, hold
            )
            await asyncio.sleep(hold)

    async def checkpoint(self, data: Mapping[str, Any]) -> None:
        await self._recorder.checkpoint(self._task, data)

    def progress(self, item: str, done: int, total: int) -> None:
        self._recorder.report_progress(self._task, item, done, total)

    def note(self, key: str, value: Any) -> None:
        self._recorder.note(self._task, key, value)

    def attach_limits(self, limits: LiveLimits | None) -> None:
        self._task.live_limits = limits

    async def tuning_changed(self) -> None:
        """Return when a PATCH changed the tuning since the previous return (or since this run started).

        A PATCH that lands while the engine is busy elsewhere is not lost: the next call returns at once.
        """
        while self._task.tuning_generation == self._tuning_seen:
            await self._task.wait_retuned()
        self._tuning_seen = self._task.tuning_generation
