"""The journal's SQLite file: its tables, how it is opened, and one transaction."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from agent.errors import StorageError

SCHEMA_VERSION = 1

SCHEMA = """
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


def connect(path: Path) -> sqlite3.Connection:
    """Create (``0600`` in a ``0700`` directory) or open the journal: WAL, synchronous=FULL, autocommit."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except (OSError, sqlite3.Error) as err:
        raise StorageError(f"cannot open the journal {path}", details=str(err)) from err
    return db


class Transaction:
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
