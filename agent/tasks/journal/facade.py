"""The journal's async face: every call is one transaction, queued to one worker thread in order.

Threading choice: one connection used only by one dedicated worker thread (a single-thread executor). Calls
are queued in order, so writes keep the order in which the loop issued them, a slow disk (``fsync`` with
``synchronous=FULL``) never stalls the event loop, and there is no locking between threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from agent.errors import StorageError
from agent.migration.states import TaskState
from agent.tasks.journal import outbox_table, tasks_table
from agent.tasks.journal.rows import OutboxEntry, TaskRecord, dumps, opt_dumps
from agent.tasks.journal.schema import connect
from agent.tasks.journal.tasks_table import FINAL_STATES

_T = TypeVar("_T")
_P = ParamSpec("_P")


class Journal:
    """Async facade over the SQLite journal; open with ``await Journal.open(path)``, end with ``close()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> Journal:
        journal = cls(path)
        try:
            await journal._run("open", journal._open)
        except BaseException:
            journal._executor.shutdown(wait=True)
            raise
        return journal

    async def close(self) -> None:
        """Close the connection and the worker thread; a second call does nothing."""
        if self._closed:
            return
        try:
            await self._run("close", self._close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    # -- tasks ---------------------------------------------------------------------------------------------

    async def insert_task(self, record: TaskRecord) -> None:
        """A new task with its first state (PENDING)."""
        await self._call(tasks_table.insert_task, record)

    async def record_state(
        self,
        task_uuid: str,
        state: TaskState,
        detail: str | None,
        at: float,
        *,
        progress: Mapping[str, Any] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        await self._call(
            tasks_table.record_state, task_uuid, state, detail, at, progress, details, None, None
        )

    async def finish_task(
        self,
        task_uuid: str,
        state: TaskState,
        detail: str | None,
        at: float,
        *,
        result: Mapping[str, Any],
        progress: Mapping[str, Any] | None,
        callback: tuple[str, str] | None,
    ) -> None:
        """The final state, the final view and (``(url, body)``) the callback's outbox entry, atomically."""
        await self._call(
            tasks_table.record_state,
            task_uuid,
            state,
            detail,
            at,
            progress,
            result.get("details"),
            result,
            callback,
        )

    async def save_checkpoint(
        self,
        task_uuid: str,
        data: Mapping[str, Any],
        at: float,
        details: Mapping[str, Any] | None = None,
        progress: Mapping[str, Any] | None = None,
    ) -> None:
        """The engine's resume data, with the task's facts and progress as they are now."""
        await self._call(
            tasks_table.update,
            task_uuid,
            at,
            checkpoint=dumps(data),
            details=opt_dumps(details),
            progress=opt_dumps(progress),
        )

    async def save_tuning(self, task_uuid: str, tuning: Mapping[str, Any], at: float) -> None:
        await self._call(tasks_table.update, task_uuid, at, tuning=dumps(tuning))

    async def load_unfinished(self) -> list[TaskRecord]:
        where = f"state NOT IN ({_marks(FINAL_STATES)})"
        return await self._call(tasks_table.load, where, FINAL_STATES, None)

    async def load_recent_finished(self, limit: int) -> list[TaskRecord]:
        where = f"state IN ({_marks(FINAL_STATES)})"
        return await self._call(tasks_table.load, where, FINAL_STATES, limit)

    async def get_task(self, task_uuid: str) -> TaskRecord | None:
        records = await self._call(tasks_table.load, "uuid = ?", (task_uuid,), None)
        return records[0] if records else None

    # -- outbox --------------------------------------------------------------------------------------------

    async def due_outbox(self, now: float, limit: int) -> list[OutboxEntry]:
        return await self._call(outbox_table.due_outbox, now, limit)

    async def next_outbox_at(self) -> float | None:
        return await self._call(outbox_table.next_outbox_at)

    async def outbox_delivered(self, entry_id: int, at: float) -> None:
        await self._call(outbox_table.outbox_delivered, entry_id, at)

    async def outbox_failed(self, entry_id: int, attempts: int, next_at: float, error: str) -> None:
        await self._call(outbox_table.outbox_failed, entry_id, attempts, next_at, error)

    async def outbox_given_up(self, entry_id: int, at: float, error: str) -> None:
        await self._call(outbox_table.outbox_given_up, entry_id, at, error)

    async def add_outbox(self, task_uuid: str, url: str, body: str, at: float, *, once: bool = False) -> bool:
        """A callback written outside a task's final transaction (a dialect adapter's own report shape).

        ``task_uuid`` is what the ``taskuuid`` header will carry, verbatim. ``once``: skip it (and return
        False) when a row for the same ``task_uuid`` and ``url`` exists already, so a caller that retries
        after a crash never sends twice.
        """
        return await self._call(outbox_table.add_outbox, task_uuid, url, body, at, once)

    async def outbox_entries(self, task_uuid: str) -> list[dict[str, Any]]:
        """Every outbox row of a task (for tests and diagnostics)."""
        return await self._call(outbox_table.outbox_rows, task_uuid)

    # -- worker-thread side --------------------------------------------------------------------------------

    async def _call(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """``fn(connection, ...)`` on the worker thread."""
        return await self._run(fn.__name__, lambda: fn(self._conn, *args, **kwargs))

    async def _run(self, name: str, work: Callable[[], _T]) -> _T:
        if self._closed:
            raise StorageError(f"journal {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, work)
        except sqlite3.Error as err:
            raise StorageError(f"journal {self.path}: {name.strip('_')} failed", details=str(err)) from err

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError(f"journal {self.path} is closed")
        return self._db

    def _open(self) -> None:
        self._db = connect(self.path)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _marks(values: tuple[Any, ...]) -> str:
    return ", ".join("?" for _ in values)
