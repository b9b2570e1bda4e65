"""The SQLite journal: tasks, state history, checkpoints, final results with their outbox rows, reopen."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.errors import StorageError
from agent.migration.states import TaskState
from agent.tasks.journal import Journal, StateRow, TaskRecord


def record(uuid: str = "t1", vm: str = "vm1", at: float = 100.0) -> TaskRecord:
    return TaskRecord(
        uuid=uuid,
        vm_uuid=vm,
        request={"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": "s"}, "dstHost": {"token": "x"}},
        state=TaskState.PENDING,
        created_at=at,
        updated_at=at,
        history=[StateRow(TaskState.PENDING, None, at)],
        tuning={"bandwidth": 10, "downTime": 300},
    )


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "state" / "journal.sqlite")
    yield j
    await j.close()


async def test_file_is_private_and_in_wal_mode(tmp_path: Path, journal: Journal) -> None:
    path = tmp_path / "state" / "journal.sqlite"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_states_checkpoint_tuning_survive_a_reopen(tmp_path: Path, journal: Journal) -> None:
    await journal.insert_task(record())
    await journal.record_state("t1", TaskState.PREPARING, None, 101.0, progress={"percent": 0, "items": {}})
    await journal.save_checkpoint("t1", {"step": "prepared", "paths": ["/a"]}, 102.0, {"plan": "p"})
    await journal.record_state("t1", TaskState.COPYING, "vda", 103.0, progress={"percent": 40.0, "items": {}})
    await journal.save_tuning("t1", {"bandwidth": 20, "downTime": 500}, 104.0)
    await journal.close()

    reopened = await Journal.open(tmp_path / "state" / "journal.sqlite")
    try:
        (loaded,) = await reopened.load_unfinished()
        assert loaded.state is TaskState.COPYING
        assert [(r.state, r.detail) for r in loaded.history] == [
            (TaskState.PENDING, None),
            (TaskState.PREPARING, None),
            (TaskState.COPYING, "vda"),
        ]
        assert loaded.checkpoint == {"step": "prepared", "paths": ["/a"]}
        assert loaded.details == {"plan": "p"}
        assert loaded.tuning == {"bandwidth": 20, "downTime": 500}
        assert loaded.progress == {"percent": 40.0, "items": {}}
        assert loaded.request["dstHost"]["token"] == "x"  # a resume needs it; the file is 0600
        assert await reopened.load_recent_finished(10) == []
    finally:
        await reopened.close()


async def test_finish_writes_result_and_outbox_in_one_step(journal: Journal) -> None:
    await journal.insert_task(record())
    await journal.finish_task(
        "t1",
        TaskState.SUCCEEDED,
        None,
        110.0,
        result={"state": "SUCCEEDED", "details": {"downtimeMs": 5}},
        progress={"percent": 100.0, "items": {}},
        callback=("http://127.0.0.1:1/cb", '{"success": true}'),
    )
    assert await journal.load_unfinished() == []
    (done,) = await journal.load_recent_finished(10)
    assert done.result == {"state": "SUCCEEDED", "details": {"downtimeMs": 5}}
    (entry,) = await journal.due_outbox(now=110.0, limit=10)
    assert (entry.task_uuid, entry.url, entry.attempts) == ("t1", "http://127.0.0.1:1/cb", 0)
    assert await journal.next_outbox_at() == 110.0


async def test_outbox_retry_bookkeeping(journal: Journal) -> None:
    await journal.insert_task(record())
    await journal.finish_task(
        "t1", TaskState.FAILED, None, 1.0, result={}, progress=None, callback=("http://127.0.0.1:1/cb", "{}")
    )
    (entry,) = await journal.due_outbox(now=1.0, limit=10)
    await journal.outbox_failed(entry.id, 1, 5.0, "HTTP 503")
    assert await journal.due_outbox(now=4.9, limit=10) == []
    (again,) = await journal.due_outbox(now=5.0, limit=10)
    assert again.attempts == 1
    await journal.outbox_delivered(entry.id, 6.0)
    assert await journal.due_outbox(now=100.0, limit=10) == []
    assert await journal.next_outbox_at() is None
    (row,) = await journal.outbox_entries("t1")
    assert row["delivered_at"] == 6.0 and row["last_error"] == "HTTP 503"


async def test_given_up_rows_are_not_due(journal: Journal) -> None:
    await journal.insert_task(record())
    await journal.finish_task(
        "t1", TaskState.FAILED, None, 1.0, result={}, progress=None, callback=("http://127.0.0.1:1/cb", "{}")
    )
    (entry,) = await journal.due_outbox(now=1.0, limit=10)
    await journal.outbox_given_up(entry.id, 2.0, "too old")
    assert await journal.due_outbox(now=100.0, limit=10) == []


async def test_unknown_task_and_duplicates_are_errors(journal: Journal) -> None:
    with pytest.raises(StorageError):
        await journal.record_state("nope", TaskState.FAILED, None, 1.0)
    await journal.insert_task(record())
    with pytest.raises(StorageError):
        await journal.insert_task(record())
    assert (await journal.get_task("t1")) is not None
    assert (await journal.get_task("nope")) is None


async def test_recent_finished_is_limited_to_the_newest(journal: Journal) -> None:
    for index in range(5):
        await journal.insert_task(record(uuid=f"t{index}", at=float(index)))
        await journal.finish_task(
            f"t{index}",
            TaskState.SUCCEEDED,
            None,
            float(index) + 0.5,
            result={},
            progress=None,
            callback=None,
        )
    newest = await journal.load_recent_finished(2)
    assert [r.uuid for r in newest] == ["t3", "t4"]


async def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot open the journal"):
        await Journal.open(blocker / "journal.sqlite")
