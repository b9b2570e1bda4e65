"""The tasks and their state history, on the journal's worker thread: each function is one transaction."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from agent.errors import StorageError
from agent.migration.states import TaskState
from agent.tasks.journal.rows import StateRow, TaskRecord, dumps, opt_dumps, opt_loads
from agent.tasks.journal.schema import Transaction

FINAL_STATES = tuple(state.value for state in TaskState if state.final)


def insert_task(db: sqlite3.Connection, record: TaskRecord) -> None:
    with Transaction(db):
        db.execute(
            "INSERT INTO tasks (uuid, vm_uuid, request, state, created_at, updated_at, tuning)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.uuid,
                record.vm_uuid,
                dumps(record.request),
                record.state.value,
                record.created_at,
                record.updated_at,
                opt_dumps(record.tuning),
            ),
        )
        for seq, row in enumerate(record.history):
            db.execute(
                "INSERT INTO task_states (task_uuid, seq, state, detail, at) VALUES (?, ?, ?, ?, ?)",
                (record.uuid, seq, row.state.value, row.detail, row.at),
            )


def record_state(
    db: sqlite3.Connection,
    task_uuid: str,
    state: TaskState,
    detail: str | None,
    at: float,
    progress: Mapping[str, Any] | None,
    details: Mapping[str, Any] | None,
    result: Mapping[str, Any] | None,
    callback: tuple[str, str] | None,
) -> None:
    with Transaction(db):
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
                params.append(dumps(value))
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


def update(db: sqlite3.Connection, /, task_uuid: str, at: float, **columns: str | None) -> None:
    pairs = [(name, value) for name, value in columns.items() if value is not None]
    sets = ", ".join(f"{name} = ?" for name, _ in pairs)
    with Transaction(db):
        cursor = db.execute(
            f"UPDATE tasks SET {sets}, updated_at = ? WHERE uuid = ?",
            (*(value for _, value in pairs), at, task_uuid),
        )
        if cursor.rowcount != 1:
            raise StorageError(f"journal has no task {task_uuid}")


def load(db: sqlite3.Connection, where: str, params: tuple[Any, ...], limit: int | None) -> list[TaskRecord]:
    sql = (
        "SELECT uuid, vm_uuid, request, state, created_at, updated_at, tuning, checkpoint, details,"
        f" progress, result FROM tasks WHERE {where} ORDER BY created_at DESC"
    )
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
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
                tuning=opt_loads(row[6]),
                checkpoint=opt_loads(row[7]),
                details=opt_loads(row[8]),
                progress=opt_loads(row[9]),
                result=opt_loads(row[10]),
            )
        )
    records.reverse()
    return records
