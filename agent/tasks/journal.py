"""The task journal: SQLite (stdlib ``sqlite3``, WAL) at ``<state_dir>/journal.sqlite``.

Every task, every state change, every engine checkpoint, every retune and the final result (together with its
outbox entry for the callback) is committed here *before* the step it announces; on start the agent reads
back the unfinished tasks. The outbox holds final results until the management plane has them.

Threading choice: one connection used only by one dedicated worker thread (a single-thread executor). Calls
are queued in order, so writes keep the order in which the loop issued them, a slow disk (``fsync`` with
``synchronous=FULL``) never stalls the event loop, and there is no locking between threads. Each public
coroutine is one transaction.

The journal holds the full request, including a destination agent's token when the management plane gave
one (a resumed task needs it); the file is created ``0600`` inside a ``0700`` state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import StorageError
from agent.tasks.model import TaskState

_T = TypeVar("_T")

SCHEMA_VERSION = 1
_FINAL_STATES = tuple(state.value for state in TaskState if state.final)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    uuid        TEXT PRIMARY KEY,
    vm_uuid     TEXT NOT NULL,
    request     TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    tuning      TEXT,
    checkpoint  TEXT,
    details     TEXT,
    progress    TEXT,
    result      TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state);
CREATE TABLE IF NOT EXISTS task_states (
    task_uuid   TEXT NOT NULL REFERENCES tasks(uuid),
    seq         INTEGER NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT,
    at          REAL NOT NULL,
    PRIMARY KEY (task_uuid, seq)
);
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_uuid       TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at    REAL,
    given_up_at     REAL,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_attempt_at) WHERE delivered_at IS NULL
    AND given_up_at IS NULL;
"""


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
            await journal._call(journal._open)
        except BaseException:
            journal._executor.shutdown(wait=True)
            raise
        return journal

    async def close(self) -> None:
        """Close the connection and the worker thread; a second call does nothing."""
        if self._closed:
            return
        try:
            await self._call(self._close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    # -- tasks ---------------------------------------------------------------------------------------------

    async def insert_task(self, record: TaskRecord) -> None:
        """A new task with its first state (PENDING)."""
        await self._call(self._insert_task, record)

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
        await self._call(self._record_state, task_uuid, state, detail, at, progress, details, None, None)

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
            self._record_state,
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
            self._update,
            task_uuid,
            at,
            checkpoint=_dumps(data),
            details=_opt_dumps(details),
            progress=_opt_dumps(progress),
        )

    async def save_tuning(self, task_uuid: str, tuning: Mapping[str, Any], at: float) -> None:
        await self._call(self._update, task_uuid, at, tuning=_dumps(tuning))

    async def load_unfinished(self) -> list[TaskRecord]:
        return await self._call(self._load, f"state NOT IN ({_marks(_FINAL_STATES)})", _FINAL_STATES, None)

    async def load_recent_finished(self, limit: int) -> list[TaskRecord]:
        where = f"state IN ({_marks(_FINAL_STATES)})"
        return await self._call(self._load, where, _FINAL_STATES, limit)

    async def get_task(self, task_uuid: str) -> TaskRecord | None:
        records = await self._call(self._load, "uuid = ?", (task_uuid,), None)
        return records[0] if records else None

    # -- outbox --------------------------------------------------------------------------------------------

    async def due_outbox(self, now: float, limit: int) -> list[OutboxEntry]:
        return await self._call(self._due_outbox, now, limit)

    async def next_outbox_at(self) -> float | None:
        return await self._call(self._next_outbox_at)

    async def outbox_delivered(self, entry_id: int, at: float) -> None:
        await self._call(self._exec, "UPDATE outbox SET delivered_at = ? WHERE id = ?", (at, entry_id))

    async def outbox_failed(self, entry_id: int, attempts: int, next_at: float, error: str) -> None:
        await self._call(
            self._exec,
            "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
            (attempts, next_at, error[:2000], entry_id),
        )

    async def outbox_given_up(self, entry_id: int, at: float, error: str) -> None:
        await self._call(
            self._exec,
            "UPDATE outbox SET given_up_at = ?, last_error = ? WHERE id = ?",
            (at, error[:2000], entry_id),
        )

    async def add_outbox(self, task_uuid: str, url: str, body: str, at: float, *, once: bool = False) -> bool:
        """A callback written outside a task's final transaction (a dialect adapter's own report shape).

        ``task_uuid`` is what the ``taskuuid`` header will carry, verbatim. ``once``: skip it (and return
        False) when a row for the same ``task_uuid`` and ``url`` exists already, so a caller that retries
        after a crash never sends twice.
        """
        return await self._call(self._add_outbox, task_uuid, url, body, at, once)

    async def outbox_entries(self, task_uuid: str) -> list[dict[str, Any]]:
        """Every outbox row of a task (for tests and diagnostics)."""
        return await self._call(self._outbox_rows, task_uuid)

    # -- worker-thread side --------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        if self._closed:
            raise StorageError(f"journal {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        except sqlite3.Error as err:
            raise StorageError(
                f"journal {self.path}: {fn.__name__.strip('_')} failed", details=str(err)
            ) from err

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError(f"journal {self.path} is closed")
        return self._db

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as err:
            raise StorageError(f"cannot open the journal {self.path}", details=str(err)) from err
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _exec(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._transaction() as db:
            db.execute(sql, params)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    def _insert_task(self, record: TaskRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO tasks (uuid, vm_uuid, request, state, created_at, updated_at, tuning)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.uuid,
                    record.vm_uuid,
                    _dumps(record.request),
                    record.state.value,
                    record.created_at,
                    record.updated_at,
                    _opt_dumps(record.tuning),
                ),
            )
            for seq, row in enumerate(record.history):
                db.execute(
                    "INSERT INTO task_states (task_uuid, seq, state, detail, at) VALUES (?, ?, ?, ?, ?)",
                    (record.uuid, seq, row.state.value, row.detail, row.at),
                )

    def _record_state(
        self,
        task_uuid: str,
        state: TaskState,
        detail: str | None,
        at: float,
        progress: Mapping[str, Any] | None,
        details: Mapping[str, Any] | None,
        result: Mapping[str, Any] | None,
        callback: tuple[str, str] | None,
    ) -> None:
        with self._transaction() as db:
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM task_states WHERE task_uuid = ?", (task_uuid,)
            ).fetchone()
            db.execute(
                "INSERT INTO task_states (task_uuid, seq, state, detail, at) VALUES (?, ?, ?, ?, ?)",
                (task_uuid, seq, state.value, detail, at),
            )
            sets = ["state = ?", "updated_at = ?"]
            params: list[Any] = [state.value, at]
            for column, value in (("progress", progress), ("details", details), ("result", result)):
                if value is not None:
                    sets.append(f"{column} = ?")
                    params.append(_dumps(value))
            cursor = db.execute(f"UPDATE tasks SET {', '.join(sets)} WHERE uuid = ?", (*params, task_uuid))
            if cursor.rowcount != 1:
                raise StorageError(f"journal has no task {task_uuid}")
            if callback is not None:
                url, body = callback
                db.execute(
                    "INSERT INTO outbox (task_uuid, url, body, created_at, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (task_uuid, url, body, at, at),
                )

    def _add_outbox(self, task_uuid: str, url: str, body: str, at: float, once: bool) -> bool:
        with self._transaction() as db:
            if (
                once
                and db.execute(
                    "SELECT 1 FROM outbox WHERE task_uuid = ? AND url = ? LIMIT 1", (task_uuid, url)
                ).fetchone()
            ):
                return False
            db.execute(
                "INSERT INTO outbox (task_uuid, url, body, created_at, next_attempt_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (task_uuid, url, body, at, at),
            )
            return True

    def _update(self, task_uuid: str, at: float, **columns: str | None) -> None:
        pairs = [(name, value) for name, value in columns.items() if value is not None]
        sets = ", ".join(f"{name} = ?" for name, _ in pairs)
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE tasks SET {sets}, updated_at = ? WHERE uuid = ?",
                (*(value for _, value in pairs), at, task_uuid),
            )
            if cursor.rowcount != 1:
                raise StorageError(f"journal has no task {task_uuid}")

    def _load(self, where: str, params: tuple[Any, ...], limit: int | None) -> list[TaskRecord]:
        sql = (
            "SELECT uuid, vm_uuid, request, state, created_at, updated_at, tuning, checkpoint, details,"
            f" progress, result FROM tasks WHERE {where} ORDER BY created_at DESC"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        db = self._conn
        records: list[TaskRecord] = []
        for row in db.execute(sql, params).fetchall():
            history = [
                StateRow(TaskState(state), detail, at)
                for state, detail, at in db.execute(
                    "SELECT state, detail, at FROM task_states WHERE task_uuid = ? ORDER BY seq", (row[0],)
                )
            ]
            records.append(
                TaskRecord(
                    uuid=row[0],
                    vm_uuid=row[1],
                    request=json.loads(row[2]),
                    state=TaskState(row[3]),
                    created_at=row[4],
                    updated_at=row[5],
                    history=history,
                    tuning=_opt_loads(row[6]),
                    checkpoint=_opt_loads(row[7]),
                    details=_opt_loads(row[8]),
                    progress=_opt_loads(row[9]),
                    result=_opt_loads(row[10]),
                )
            )
        records.reverse()
        return records

    def _due_outbox(self, now: float, limit: int) -> list[OutboxEntry]:
        rows = self._conn.execute(
            "SELECT id, task_uuid, url, body, created_at, attempts, next_attempt_at FROM outbox"
            " WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def _next_outbox_at(self) -> float | None:
        (at,) = self._conn.execute(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE delivered_at IS NULL AND given_up_at IS NULL"
        ).fetchone()
        return None if at is None else float(at)

    def _outbox_rows(self, task_uuid: str) -> list[dict[str, Any]]:
        cursor = self._conn.execute("SELECT * FROM outbox WHERE task_uuid = ? ORDER BY id", (task_uuid,))
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


def _marks(values: tuple[Any, ...]) -> str:
    return ", ".join("?" for _ in values)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _opt_dumps(value: Any) -> str | None:
    return None if value is None else _dumps(value)


def _opt_loads(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}
