"""The outbox of final callbacks, on the journal's worker thread: each function is one transaction."""

from __future__ import annotations

import sqlite3
from typing import Any

from agent.tasks.journal.rows import OutboxEntry
from agent.tasks.journal.schema import Transaction


def add_outbox(db: sqlite3.Connection, task_uuid: str, url: str, body: str, at: float, once: bool) -> bool:
    with Transaction(db):
        if (
            once
            and db.execute(
                "SELECT 1 FROM outbox WHERE task_uuid = ? AND url = ? LIMIT 1", (task_uuid, url)
            ).fetchone()
        ):
            return False
        db.execute(
            "INSERT INTO outbox (task_uuid, url, body, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?)",
            (task_uuid, url, body, at, at),
        )
        return True


def due_outbox(db: sqlite3.Connection, now: float, limit: int) -> list[OutboxEntry]:
    rows = db.execute(
        "SELECT id, task_uuid, url, body, created_at, attempts, next_attempt_at FROM outbox"
        " WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= ?"
        " ORDER BY next_attempt_at LIMIT ?",
        (now, limit),
    ).fetchall()
    return [OutboxEntry(*row) for row in rows]


def next_outbox_at(db: sqlite3.Connection) -> float | None:
    (at,) = db.execute(
        "SELECT MIN(next_attempt_at) FROM outbox WHERE delivered_at IS NULL AND given_up_at IS NULL"
    ).fetchone()
    return None if at is None else float(at)


def outbox_rows(db: sqlite3.Connection, task_uuid: str) -> list[dict[str, Any]]:
    cursor = db.execute("SELECT * FROM outbox WHERE task_uuid = ? ORDER BY id", (task_uuid,))
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def outbox_delivered(db: sqlite3.Connection, entry_id: int, at: float) -> None:
    with Transaction(db):
        db.execute("UPDATE outbox SET delivered_at = ? WHERE id = ?", (at, entry_id))


def outbox_failed(db: sqlite3.Connection, entry_id: int, attempts: int, next_at: float, error: str) -> None:
    with Transaction(db):
        db.execute(
            "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
            (attempts, next_at, error[:2000], entry_id),
        )


def outbox_given_up(db: sqlite3.Connection, entry_id: int, at: float, error: str) -> None:
    with Transaction(db):
        db.execute(
            "UPDATE outbox SET given_up_at = ?, last_error = ? WHERE id = ?", (at, error[:2000], entry_id)
        )
