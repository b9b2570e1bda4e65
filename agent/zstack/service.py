"""ZStack commands in, the agent's own tasks run, ZStack callbacks and progress reports out.

- A migration command (``/vm/migrate``, ``/vm/blklivemigration``) gets a ``CommandRecord`` on disk as it
  arrives, then an intake in the background: parse, refuse when 60 s or less are left, find the earlier job
  of a ``reload``, translate (``agent.zstack.translate``), ``TaskManager.submit``. From there the task is an
  ordinary agent task: same engines, journal, resume after a restart, one bandwidth budget.
- The answer: when the task ends (a listener on the manager), the ZStack-shaped body goes into the journal's
  outbox under ZStack's ``taskuuid``, so it is retried with backoff and survives restarts; at start every
  unanswered record is reconciled against the journal. A refusal before any task exists is answered the same
  way. Answering is idempotent (``Journal.add_outbox(once=True)``).
- Progress: every change of an answered-to-be task becomes a report to the ``sendCommandUrl`` learned from
  ``/host/connect`` through the agent's ``ProgressReporter`` (latest wins, about once per second), header
  ``commandpath: /progress/report``, the percent capped at 99 until done and mapped into ``task-stage``.
- A duplicate ``taskuuid`` is ignored; a ``reload`` reports the real outcome of the earlier job (same
  ``taskuuid``, else the VM's running task, else the latest job of the same kind for the same VM and volume).
- ``/job/cancel`` cancels the tasks whose command carried ``threadContext.api`` = ``cancellationApiId``.

Background work (intakes, answers, delayed replies) is owned here (``BackgroundWork``) and cancelled by
``stop()``; the records live in a ``CommandLedger``; the command bodies are read by ``intake``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

import agent
from agent.api.keys import VmInventory
from agent.config import AgentConfig
from agent.errors import AgentError, Busy
from agent.migration.request import MigrationRequest, normalise_uuid
from agent.migration.states import TaskState
from agent.report.outbox import OutboxDeliverer
from agent.report.progress import ProgressReporter
from agent.tasks.hooks import ChangeKind, TaskChange
from agent.tasks.journal import Journal
from agent.tasks.manager import TaskManager
from agent.tasks.task import Task
from agent.zstack import translate
from agent.zstack.background import BackgroundWork
from agent.zstack.intake import Refused, parse, wants_reload
from agent.zstack.ledger import CommandLedger
from agent.zstack.records import CommandRecord, CommandStore, HostLink
from agent.zstack.wire import (
    COMMAND_PATH_HEADER,
    MIN_REMAINING_S,
    PROGRESS_COMMAND_PATH,
    URL_RE,
    BlockLiveMigrationCmd,
    CancelCmd,
    ConnectCmd,
    MigrateVmCmd,
    answer,
    error_message,
    progress_body,
    remaining_s,
    staged_percent,
)

log = logging.getLogger(__name__)

_PROGRESS_CHANGES = (ChangeKind.CREATED, ChangeKind.STATE, ChangeKind.PHASE, ChangeKind.PROGRESS)
#: Bounds on ``/job/cancel``'s ``times`` and ``interval`` (the handler waits that long at most).
MAX_CANCEL_TIMES = 10
MAX_CANCEL_INTERVAL_S = 10.0


class ZStackService:
    """See the module docstring; ``start()`` after the task manager started, ``stop()`` before it stops."""

    def __init__(
        self,
        config: AgentConfig,
        manager: TaskManager,
        journal: Journal,
        outbox: OutboxDeliverer,
        progress: ProgressReporter,
        session: aiohttp.ClientSession,
        *,
        inventory: VmInventory | None = None,
        virt_host: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._manager = manager
        self._journal = journal
        self._outbox = outbox
        self._progress = progress
        self._session = session
        self._inventory = inventory
        self._virt_host = virt_host
        self._clock = clock
        self._ledger = CommandLedger(CommandStore(config.state_dir / "zstack"))
        self._answering: set[str] = set()
        self._background = BackgroundWork()
        self.link = HostLink()

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen to the manager, load the records, answer those whose task ended while nobody listened."""
        self._manager.add_listener(self._on_change)
        records, self.link = await self._ledger.load(self._clock())
        pending = [r for r in records if not r.answered]
        if pending:
            log.info("zstack: %d unanswered commands from before the start", len(pending))
        for record in pending:
            await self._reconcile(record)

    async def stop(self) -> None:
        await self._background.stop()

    async def _reconcile(self, record: CommandRecord) -> None:
        if record.agent_task is None:
            await self._deliver(
                record,
                answer(False, "the agent restarted before this command became a task; nothing was started"),
            )
            return
        task = await self._manager.find(record.agent_task)
        if task is None:
            await self._deliver(record, answer(False, f"the agent has no record of task {record.agent_task}"))
        elif task.state.final:
            await self._answer_task(record, task)
        # else: resumed by the manager; the listener answers when it ends

    # -- migration commands --------------------------------------------------------------------------------

    async def receive(self, kind: str, task_uuid: str, callback_url: str, body: bytes) -> None:
        """Take an asynchronous migration command; the handler answers 200 right after this returns."""
        known = self._ledger.get(task_uuid)
        if known is not None:
            await self._duplicate(known, body)
            return
        limits = self.config.zstack
        if self._ledger.unanswered() >= limits.max_open_commands:
            raise Busy(
                f"{limits.max_open_commands} ZStack commands are open on this host; try again later",
                retry_after_s=30,
                details="[zstack] max_open_commands in agent.toml",
            )
        self._ledger.forget_old(self._clock(), keep=limits.max_records)
        record = CommandRecord(task_uuid, kind, callback_url, self._clock())
        self._ledger.add(record)
        await self._ledger.save(record)
        self._background.spawn(self._intake(record, body), f"zstack-intake-{task_uuid}")

    async def _duplicate(self, record: CommandRecord, body: bytes) -> None:
        if wants_reload(body) and record.answered and record.agent_task:
            task = await self._manager.find(record.agent_task)
            if task is not None and task.state.final:
                log.info("zstack task=%s: reload of an answered command; answering again", record.task_uuid)
                await self._answer_task(record, task, again=True)
                return
        log.info("zstack task=%s: ignored duplicated task", record.task_uuid)

    async def _intake(self, record: CommandRecord, body: bytes) -> None:
        try:
            await self._accept(record, body)
        except asyncio.CancelledError:
            raise
        except Refused as err:
            await self._refuse(record, str(err))
        except AgentError as err:
            await self._refuse(record, error_message(err.to_error_code()))
        except Exception as err:
            log.exception("zstack task=%s: the command could not be taken", record.task_uuid)
            await self._refuse(record, f"internal error in the agent: {type(err).__name__}: {err}")

    async def _accept(self, record: CommandRecord, body: bytes) -> None:
        cmd = parse(record.kind, body)
        record.thread_context = dict(cmd.threadContext)
        record.thread_context_stack = list(cmd.threadContextStack)
        record.vm_uuid = translate.vm_uuid_of(cmd.vmUuid)
        if isinstance(cmd, BlockLiveMigrationCmd):
            record.volume = cmd.oldVolumePath
        await self._ledger.save(record)
        remaining = remaining_s(cmd.taskContext, self._clock())
        if remaining is not None and remaining <= MIN_REMAINING_S:
            raise Refused(f"timeout[{int(remaining)}] is too short")
        if cmd.reload:
            earlier = self._earlier(record)
            if earlier is not None:
                log.info("zstack task=%s: reload answers with task %s", record.task_uuid, earlier)
                await self._attach(record, earlier)
                return
        if record.cancel_requested:
            raise Refused("cancelled before it started")
        if self._inventory is not None:
            await self._inventory.describe_vm(record.vm_uuid)  # NotFound: a clear answer before any work
        request = await self._request(record, cmd, remaining)
        if record.cancel_requested:
            raise Refused("cancelled before it started")
        task, _created = await self._manager.submit(record.vm_uuid, request)
        log.info(
            "zstack task=%s: %s of VM %s runs as task %s",
            record.task_uuid,
            record.kind,
            task.vm_uuid,
            task.uuid,
        )
        await self._attach(record, task.uuid)
        if record.cancel_requested:
            await self._manager.cancel(task.uuid)

    async def _request(
        self, record: CommandRecord, cmd: MigrateVmCmd | BlockLiveMigrationCmd, remaining: float | None
    ) -> MigrationRequest:
        try:
            task_uuid = normalise_uuid(record.task_uuid)
        except ValueError:
            task_uuid = str(uuidlib.uuid4())
        if isinstance(cmd, BlockLiveMigrationCmd):
            return await translate.block_copy_request(cmd, task_uuid, self.config, remaining)
        return await translate.migrate_request(cmd, task_uuid, self.config, self._session, remaining)

    def _earlier(self, record: CommandRecord) -> str | None:
        """The job a ``reload`` asks about: the VM's running task, else the latest of the same kind."""
        assert record.vm_uuid is not None
        active = self._manager.active_task_for(record.vm_uuid)
        if active is not None:
            return active.uuid
        return self._ledger.latest_like(record)

    async def _attach(self, record: CommandRecord, agent_task: str) -> None:
        # Indexed before the first await, so the listener sees every change from here on.
        self._ledger.attach(record, agent_task)
        await self._ledger.save(record)
        task = await self._manager.find(agent_task)
        if task is None:
            await self._deliver(record, answer(False, f"task {agent_task} is gone"))
        elif task.state.final:
            await self._answer_task(record, task)
        else:
            self._push_progress(record, task)

    # -- answers -------------------------------------------------------------------------------------------

    async def _refuse(self, record: CommandRecord, message: str) -> None:
        log.warning("zstack task=%s: %s refused: %s", record.task_uuid, record.kind, message)
        await self._deliver(record, answer(False, message))

    async def _answer_task(self, record: CommandRecord, task: Task, *, again: bool = False) -> None:
        succeeded = task.state is TaskState.SUCCEEDED
        body = answer(True) if succeeded else answer(False, error_message(task.error))
        await self._deliver(record, body, again=again)

    async def _deliver(self, record: CommandRecord, body: dict[str, Any], *, again: bool = False) -> None:
        """Put the answer into the outbox (retried, kept across restarts) and mark the record answered."""
        if not again and (record.answered or record.task_uuid in self._answering):
            return
        self._answering.add(record.task_uuid)
        try:
            added = await self._journal.add_outbox(
                record.task_uuid, record.callback_url, json.dumps(body), self._clock(), once=not again
            )
            record.answered = True
            await self._ledger.save(record)
        finally:
            self._answering.discard(record.task_uuid)
        self._outbox.wake()
        if added:
            log.info(
                "zstack task=%s: answer queued for %s (success=%s, agent task %s)",
                record.task_uuid,
                record.callback_url,
                body["success"],
                record.agent_task,
            )

    # -- task events ---------------------------------------------------------------------------------------

    def _on_change(self, task: Task, change: TaskChange) -> None:
        if self._background.stopped:
            return
        for record in self._ledger.answered_by(task.uuid):
            if change.kind is ChangeKind.FINISHED:
                self._push_progress(record, task, final=True)
                self._background.spawn(self._answer_task(record, task), f"zstack-answer-{record.task_uuid}")
            elif change.kind in _PROGRESS_CHANGES:
                self._push_progress(record, task)

    @property
    def server_uuid(self) -> str:
        return self.link.host_uuid or self.config.host_uuid.replace("-", "")

    def _push_progress(self, record: CommandRecord, task: Task, *, final: bool = False) -> None:
        url = self.link.send_command_url
        if not url:
            return

        def payload() -> dict[str, Any]:
            snapshot = task.tracker.snapshot()
            done = task.state is TaskState.SUCCEEDED
            return progress_body(
                percent=staged_percent(snapshot.percent, record.thread_context, done=done),
                process_type=record.kind,
                server_uuid=self.server_uuid,
                done=snapshot.bytes_done,
                total=snapshot.bytes_total,
                speed=snapshot.bytes_per_second,
                eta=snapshot.eta_seconds,
                thread_context=record.thread_context,
                thread_context_stack=record.thread_context_stack,
            )

        self._progress.push(
            record.task_uuid, url, payload, final=final, headers={COMMAND_PATH_HEADER: PROGRESS_COMMAND_PATH}
        )

    # -- other commands ------------------------------------------------------------------------------------

    async def cancel(self, cmd: CancelCmd) -> dict[str, Any]:
        """Cancel every unanswered command whose ``threadContext.api`` matches, trying ``times`` times."""
        times = min(max(cmd.times or 1, 1), MAX_CANCEL_TIMES)
        interval = min(max(float(cmd.interval or 0), 0.0), MAX_CANCEL_INTERVAL_S)
        for attempt in range(times):
            matched = self._ledger.unanswered_for_api(cmd.cancellationApiId)
            if matched:
                for record in matched:
                    await self._cancel_record(record)
                return answer(True)
            if attempt + 1 < times:
                await asyncio.sleep(interval)
        return answer(False, "no matched job to cancel")

    async def _cancel_record(self, record: CommandRecord) -> None:
        log.info("zstack task=%s: cancel requested (agent task %s)", record.task_uuid, record.agent_task)
        record.cancel_requested = True
        await self._ledger.save(record)
        if record.agent_task is not None:
            try:
                await self._manager.cancel(record.agent_task)
            except AgentError as err:
                log.warning("zstack task=%s: cancel failed: %s", record.task_uuid, err.description)

    async def connect(self, cmd: ConnectCmd) -> dict[str, Any]:
        if cmd.sendCommandUrl and not URL_RE.match(cmd.sendCommandUrl):
            return answer(False, "sendCommandUrl must be an http(s) URL")
        self.link = HostLink(cmd.hostUuid, cmd.sendCommandUrl)
        await self._ledger.save_link(self.link)
        log.info("zstack: connected as host %s; progress goes to %s", cmd.hostUuid, cmd.sendCommandUrl)
        versions: dict[str, str] = {}
        if self._virt_host is not None:
            try:
                versions = await self._virt_host.versions()
            except AgentError as err:
                log.warning("zstack: libvirt and QEMU versions unknown: %s", err.description)
        return answer(True, libvirtVersion=versions.get("libvirt"), qemuVersion=versions.get("qemu"))

    def ping(self) -> dict[str, Any]:
        return answer(
            True,
            hostUuid=self.link.host_uuid,
            sendCommandUrl=self.link.send_command_url,
            version=agent.__version__,
        )

    def reply_later(
        self, task_uuid: str, callback_url: str, work: Callable[[], Awaitable[dict[str, Any]]]
    ) -> None:
        """An asynchronous small command (ping, cancel): run ``work``, then POST its answer via the outbox."""

        async def run() -> None:
            try:
                body = await work()
            except AgentError as err:
                body = answer(False, error_message(err.to_error_code()))
            await self._journal.add_outbox(task_uuid, callback_url, json.dumps(body), self._clock())
            self._outbox.wake()

        self._background.spawn(run(), f"zstack-reply-{task_uuid}")
