"""The task manager: accepts migrations, queues them under the limits, runs engines, cancels, retunes.

Rules it keeps:
- one active task per VM; the same ``taskUuid`` again gives the same task (idempotency, also after a restart);
- at most ``outgoing_limit`` engines run at once, the rest wait in QUEUED (never refused), with their
  position and the reason in their view; the queue is ordered by priority, first come first served within
  one (``admission``), and rebuilt in the same order from the journal after a restart;
- every change is journalled before it becomes visible (``TaskRecorder``), so what the API shows is durable;
- cancel is idempotent and safe in every state: a task that has no engine yet ends CANCELLED at once, a
  running engine gets ``CancelledError`` (it undoes its work) after CANCELLING is journalled;
- stopping the agent *detaches*: engines are cancelled with ``ctx.detaching`` set, nothing final is written,
  and the tasks are handed back with ``resume=True`` at the next start.

Ownership: the manager keeps one driver ``asyncio.Task`` per task run and one engine task inside it;
``stop()`` cancels and awaits the drivers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.errors import (
    AgentError,
    Code,
    Conflict,
    LimitsNotApplied,
    MigrationFailed,
    NotFound,
    ServiceStopping,
)
from agent.migration import runner
from agent.migration.engine import EngineFactory
from agent.migration.limits import pending_view
from agent.migration.request import HostBudgetChange, MigrationRequest, Tuning
from agent.migration.states import TaskState
from agent.tasks.admission import Admission, Rank
from agent.tasks.context import RunContext
from agent.tasks.holds import PhaseHolds
from agent.tasks.hooks import ChangeKind, TaskChange, TaskListener
from agent.tasks.hostbudget import HostBudget
from agent.tasks.journal import Journal
from agent.tasks.recorder import TaskRecorder, cancelled_error
from agent.tasks.records import new_record, task_from_record
from agent.tasks.task import Task
from agent.units import MiB

log = logging.getLogger(__name__)

#: How long a PATCH waits for QEMU to take the new limits before it answers 503.
RETUNE_APPLY_S = 10.0
#: States in which the streams a retune governs have ended (the switch is under way).
_PAST_THE_STREAMS = frozenset({TaskState.SWITCHING, TaskState.VERIFYING})


class TaskManager:
    """Owns every task of this agent (see the module docstring); ``start()`` first, ``stop()`` last."""

    def __init__(
        self,
        journal: Journal,
        engine_factory: EngineFactory,
        *,
        outgoing_limit: int,
        keep_finished: int = 1000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        holds: PhaseHolds | None = None,
        host_budget: HostBudget | None = None,
    ) -> None:
        self._journal = journal
        self._holds = holds
        self.recorder = TaskRecorder(journal, clock=clock, monotonic=monotonic)
        self._factory = engine_factory
        self._keep_finished = keep_finished
        self._clock = clock
        self._tasks: dict[str, Task] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._engines: dict[str, asyncio.Task[runner.Verdict]] = {}
        self._admission = Admission(outgoing_limit, on_change=self._queue_changed)
        #: The host-wide budget the running cross-host tasks share (none unless configured or PATCHed).
        self.budget = host_budget or HostBudget(None, crosses_link=lambda task: False)
        self._queued: set[str] = set()  # tasks whose view shows a place in the queue
        # Incoming migrations are limited where they are prepared (agent.migration.incoming.service).
        self._submit_lock = asyncio.Lock()
        self._stopping = False
        self._detaching = False

    # -- lifecycle -----------------------------------------------------------------------------------------

    def add_listener(self, listener: TaskListener) -> None:
        self.recorder.add_listener(listener)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def detaching(self) -> bool:
        return self._detaching

    async def start(self) -> None:
        """Load recent finished tasks (views, idempotency) and hand the unfinished ones to their engines."""
        for record in await self._journal.load_recent_finished(self._keep_finished):
            try:
                self._tasks[record.uuid] = task_from_record(record)
            except AgentError:
                log.exception(
                    "task=%s vm=%s: skipping an unreadable finished task", record.uuid, record.vm_uuid
                )
        found: list[Task] = []
        for record in await self._journal.load_unfinished():
            try:
                task = task_from_record(record)
            except AgentError as err:
                log.exception(
                    "task=%s vm=%s: unfinished task cannot be read back; marking it FAILED",
                    record.uuid,
                    record.vm_uuid,
                )
                await self._journal.record_state(record.uuid, TaskState.FAILED, str(err), self._clock())
                continue
            self._tasks[task.uuid] = task
            found.append(task)
        # Tasks under way take their slots first, then the queue in its order (``admission``).
        for task in sorted(found, key=lambda t: self._rank(t, _resumes(t))):
            task.cancel_requested = task.state is TaskState.CANCELLING
            resume = _resumes(task)
            log.info(
                "task=%s vm=%s: found unfinished in state %s, handing it back (resume=%s)",
                task.uuid,
                task.vm_uuid,
                task.state,
                resume,
            )
            self._start_driver(task, resume=resume)

    def begin_stop(self) -> None:
        """Refuse new work from now on (the API answers 503)."""
        self._stopping = True

    async def stop(self, grace_s: float) -> None:
        """Detach from every running task (see the module docstring); await the drivers up to ``grace_s``."""
        self._stopping = True
        self._detaching = True
        drivers = list(self._drivers.values())
        for driver in drivers:
            driver.cancel()
        if drivers:
            _, pending = await asyncio.wait(drivers, timeout=grace_s)
            for driver in pending:
                log.warning("%s did not stop within %.1f s; leaving it", driver.get_name(), grace_s)
        await self.budget.close()

    # -- queries -------------------------------------------------------------------------------------------

    def get(self, task_uuid: str) -> Task:
        task = self._tasks.get(task_uuid)
        if task is None:
            raise NotFound(f"no task {task_uuid}", field="taskUuid")
        return task

    def known(self, task_uuid: str) -> Task | None:
        """A task in memory (None: unknown, or finished and pruned from memory)."""
        return self._tasks.get(task_uuid)

    async def find(self, task_uuid: str) -> Task | None:
        """A task in memory, else from the journal (finished tasks pruned from memory)."""
        task = self._tasks.get(task_uuid)
        if task is not None:
            return task
        record = await self._journal.get_task(task_uuid)
        return None if record is None else task_from_record(record)

    def tasks(self, *, state: TaskState | None = None, vm_uuid: str | None = None) -> list[Task]:
        found = [
            task
            for task in self._tasks.values()
            if (state is None or task.state is state) and (vm_uuid is None or task.vm_uuid == vm_uuid)
        ]
        return sorted(found, key=lambda task: task.created_at)

    def active_task_for(self, vm_uuid: str) -> Task | None:
        return next((t for t in self._tasks.values() if t.vm_uuid == vm_uuid and t.state.active), None)

    def count_by_state(self) -> dict[TaskState, int]:
        counts = dict.fromkeys(TaskState, 0)
        for task in self._tasks.values():
            counts[task.state] += 1
        return counts

    # -- commands ------------------------------------------------------------------------------------------

    async def submit(self, vm_uuid: str, request: MigrationRequest) -> tuple[Task, bool]:
        """Accept a migration of ``vm_uuid``; returns ``(task, created)``. ``request.taskUuid`` must be set.

        Raises ``Conflict`` when the VM has another active task or the taskUuid names a different request,
        ``ServiceStopping`` while the agent stops.
        """
        task_uuid = request.taskUuid
        if task_uuid is None:
            raise ValueError("submit() needs request.taskUuid")
        if self._stopping:
            raise ServiceStopping("the agent is stopping; no new migrations")
        async with self._submit_lock:
            existing = await self.find(task_uuid)
            if existing is not None:
                if existing.vm_uuid != vm_uuid or _fingerprint(existing.request) != _fingerprint(request):
                    raise Conflict(
                        f"taskUuid {task_uuid} is already used by a different request",
                        field="taskUuid",
                        taskUuid=task_uuid,
                    )
                return existing, False
            if self._stopping:
                raise ServiceStopping("the agent is stopping; no new migrations")
            active = self.active_task_for(vm_uuid)
            if active is not None:
                raise Conflict(
                    f"VM {vm_uuid} already has task {active.uuid} in state {active.state}",
                    field="vmUuid",
                    taskUuid=active.uuid,
                )
            task = Task.new(task_uuid, vm_uuid, request, self._clock())
            await self._journal.insert_task(new_record(task))
            self._tasks[task.uuid] = task
        log.info(
            "task=%s vm=%s: accepted (storage %s, host %s, strategy %s)",
            task.uuid,
            vm_uuid,
            request.primaryStorageMigrateVm.dstPrimaryStorageUuid,
            request.primaryStorageMigrateVm.dstHostUuid or "this",
            request.primaryStorageMigrateVm.strategy,
        )
        self.recorder.notify(task, TaskChange(ChangeKind.CREATED))
        self._start_driver(task, resume=False)
        return task, True

    async def cancel(self, task_uuid: str) -> Task:
        """Cancel a task; idempotent, safe in every state (a finished task is returned unchanged)."""
        task = self._tasks.get(task_uuid) or await self.find(task_uuid)
        if task is None:
            raise NotFound(f"no task {task_uuid}", field="taskUuid")
        if _settled(task):
            return task
        task.cancel_requested = True  # from here on the driver never starts an engine for a waiting task
        async with task.lock:
            if _settled(task):
                return task
            engine = self._engines.get(task.uuid)
            if engine is None and task.state.waiting:
                await self.recorder.finish(
                    task,
                    TaskState.CANCELLED,
                    "cancelled before start",
                    error=cancelled_error(),
                    lock_held=True,
                )
                task.apply_queue(None)  # its driver leaves the queue as it ends
                driver = self._drivers.get(task.uuid)
                if driver is not None:
                    driver.cancel()
                return task
            # A running engine, or a task resumed from the journal still waiting for its slot: its engine
            # will start, see CANCELLING and undo what the previous run left.
            await self.recorder.transition_locked(task, TaskState.CANCELLING, "cancel requested")
        if engine is not None:
            engine.cancel()  # right after the lock is released, before the engine can take another step
        return task

    async def retune(self, task_uuid: str, tuning: Tuning) -> Task:
        """Change bandwidth and/or downtime of an active task: journalled, then applied at once to the
        streams that run (``LiveLimits.retune``: the task's details then show what QEMU reports), or taken
        by the streams when they start. 409 once the streams it would govern have ended (the switch is under
        way); 503 (``LimitsNotApplied``) when QEMU did not take it."""
        task = self.get(task_uuid)
        async with task.lock:
            if _settled(task):
                raise Conflict(
                    f"task {task.uuid} is {task.state}; only a running task can be retuned", field="taskUuid"
                )
            if task.live_limits is None and task.state in _PAST_THE_STREAMS:
                raise Conflict(
                    f"task {task.uuid} is {task.state}: the streams a retune governs have ended",
                    code=Code.LIMITS_TOO_LATE,
                    field="taskUuid",
                )
            await self.recorder.save_tuning(task, tuning.bandwidth, tuning.downTime)
        self.budget.task_changed(task)  # its own cap bounds its host share
        limits = task.live_limits
        bandwidth = task.tuning.bandwidth_mib
        cap = bandwidth * MiB if bandwidth else None
        if limits is None:
            self.recorder.note(task, "limits", pending_view(cap, task.tuning.downtime_ms))
        else:
            try:
                async with asyncio.timeout(RETUNE_APPLY_S):
                    await limits.retune(cap=cap, downtime_ms=task.tuning.downtime_ms)
            except TimeoutError as err:
                raise LimitsNotApplied(
                    f"QEMU did not take the new limits within {RETUNE_APPLY_S:.0f} s",
                    details="libvirt or QEMU answers late; the agent applies them at its next step",
                    field="bandwidth" if tuning.bandwidth is not None else "downTime",
                ) from err
        return task

    # -- driving a task ------------------------------------------------------------------------------------

    def _start_driver(self, task: Task, *, resume: bool) -> None:
        driver = asyncio.create_task(self._drive(task, resume), name=f"task-{task.uuid}")
        self._drivers[task.uuid] = driver
        driver.add_done_callback(lambda done: self._driver_done(task, done))

    def _driver_done(self, task: Task, driver: asyncio.Task[None]) -> None:
        if self._drivers.get(task.uuid) is driver:
            del self._drivers[task.uuid]
        if not driver.cancelled():
            driver.exception()  # logged by _drive already; retrieving it keeps asyncio from warning again

    async def _drive(self, task: Task, resume: bool) -> None:
        try:
            await self._admit(task, resume)
            try:
                if task.state.final or (task.cancel_requested and task.state.waiting):
                    return  # cancelled while queued: cancel() records CANCELLED, no engine is started
                self.budget.join(task)  # its share is known before its engine starts
                await self._execute(task, resume)
            finally:
                self.budget.leave(task)
                self._admission.leave()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task=%s vm=%s: task driver failed", task.uuid, task.vm_uuid)
            raise
        finally:
            self._prune()

    async def _admit(self, task: Task, resume: bool) -> None:
        """Take a slot; when every one is taken the task waits in QUEUED (journalled) for its turn."""
        if self._admission.must_wait() and task.state is TaskState.PENDING and not task.cancel_requested:
            async with task.lock:
                if task.state is TaskState.PENDING and not task.cancel_requested:
                    await self.recorder.transition_locked(task, TaskState.QUEUED, self._queue_reason())
        await self._admission.enter(task.uuid, self._rank(task, resume))

    def _rank(self, task: Task, resume: bool) -> Rank:
        return self._admission.rank(
            priority=task.request.priority,
            created_at=task.created_at,
            resumed=resume and not task.state.waiting,
        )

    def _queue_reason(self) -> str:
        limit = self._admission.limit
        return (
            f"waiting for a slot: {self._admission.running} of {limit} outgoing migrations run on this host "
            "(limits.outgoing_migrations)"
        )

    def change_host_budget(self, change: HostBudgetChange) -> dict[str, Any]:
        """``PATCH /v1/host/budget``: a new outgoing budget and/or number of moves at once, from now on."""
        if change.outgoing is not None:
            self.budget.set_outgoing(change.outgoing * MiB or None)
        if change.outgoingMigrations is not None:
            log.info("host budget: %d outgoing migrations at once", change.outgoingMigrations)
            self._admission.set_limit(change.outgoingMigrations)
        return self.host_budget_view()

    def host_budget_view(self) -> dict[str, Any]:
        view = self.budget.view()
        view["outgoing"].update(
            migrations=self._admission.limit,
            running=self._admission.running,
            queued=self._admission.waiting(),
        )
        return view

    def _queue_changed(self) -> None:
        """Every waiting task's view shows its place in the queue, and why it waits."""
        waiting = self._admission.waiting()
        reason = self._queue_reason()
        for position, task_uuid in enumerate(waiting, 1):
            task = self._tasks.get(task_uuid)
            if task is not None:
                task.apply_queue(
                    {
                        "position": position,
                        "queued": len(waiting),
                        "priority": task.request.priority,
                        "reason": reason,
                    }
                )
        for task_uuid in self._queued - set(waiting):
            task = self._tasks.get(task_uuid)
            if task is not None:
                task.apply_queue(None)
        self._queued = set(waiting)

    async def _execute(self, task: Task, resume: bool) -> None:
        try:
            engine = self._factory(task.request, task.vm_uuid, resume)
        except AgentError as err:
            log.error("task=%s vm=%s: no engine: %s", task.uuid, task.vm_uuid, err)
            await self.recorder.finish(task, TaskState.FAILED, "no engine", error=err)
            return
        except Exception as err:
            log.exception("task=%s vm=%s: the engine factory failed", task.uuid, task.vm_uuid)
            wrapped = MigrationFailed(
                "the migration engine could not be created",
                details=f"{type(err).__name__}: {err}",
                code=Code.ENGINE_UNAVAILABLE,
            )
            wrapped.__cause__ = err
            await self.recorder.finish(task, TaskState.FAILED, "no engine", error=wrapped)
            return
        ctx = RunContext(
            self.recorder, task, resumed=resume, detaching=lambda: self._detaching, holds=self._holds
        )
        log.info(
            "task=%s vm=%s: running engine %s%s",
            task.uuid,
            task.vm_uuid,
            getattr(engine, "name", type(engine).__name__),
            " (resume)" if resume else "",
        )
        run = asyncio.create_task(runner.run(engine, ctx), name=f"engine-{task.uuid}")
        self._engines[task.uuid] = run
        if task.state is TaskState.CANCELLING:
            # The cancel was journalled before a restart: let the engine take its first step (it sees
            # ctx.cancel_requested and ctx.resume_data), then deliver the cancel so it undoes what it finds.
            asyncio.get_running_loop().call_soon(run.cancel)
        try:
            verdict = await run
        except asyncio.CancelledError:
            log.info(
                "task=%s vm=%s: detached in state %s; it stays unfinished in the journal",
                task.uuid,
                task.vm_uuid,
                task.state,
            )
            raise
        finally:
            self._engines.pop(task.uuid, None)
        inventory = None
        if verdict.inventory is not None:
            inventory = {"vmUuid": task.vm_uuid, "volumes": verdict.inventory}
        await self.recorder.finish(
            task, verdict.state, verdict.detail, error=verdict.error, inventory=inventory
        )

    # -- helpers -------------------------------------------------------------------------------------------

    def _prune(self) -> None:
        finished = [task for task in self._tasks.values() if task.state.final]
        excess = len(finished) - self._keep_finished
        if excess > 0:
            for task in sorted(finished, key=lambda t: t.finished_at or t.updated_at)[:excess]:
                del self._tasks[task.uuid]


def _resumes(task: Task) -> bool:
    """Whether a task found unfinished at start goes back to its engine's resume path."""
    return not task.state.waiting or task.resume_data is not None


def _settled(task: Task) -> bool:
    """Final, or already on its way there by a cancel (a function: mypy must not narrow the state)."""
    return task.state.final or task.state is TaskState.CANCELLING


def _fingerprint(request: MigrationRequest) -> dict[str, Any]:
    return request.model_dump(mode="json")
