"""The task manager with a scripted engine: exact state sequences, cancel in every state, limits, idempotency,
retune, timeouts, detaching on stop and resuming from the journal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from service_fakes import (
    STORAGE_A,
    VM_1,
    VM_2,
    VM_3,
    VM_4,
    VM_5,
    FakeEngine,
    FakeFactory,
    Script,
    eventually,
)

from agent.errors import Conflict, MigrationFailed, NotFound, ServiceStopping
from agent.migration.request import MigrationRequest, Tuning
from agent.migration.states import TaskState as S
from agent.tasks.journal import Journal
from agent.tasks.manager import TaskManager
from agent.tasks.task import Task

HAPPY = [S.PENDING, S.PREPARING, S.COPYING, S.SWITCHING, S.VERIFYING, S.SUCCEEDED]


def request(task_uuid: str, **extra: Any) -> MigrationRequest:
    data: dict[str, Any] = {
        "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_A},
        "migrateVm": {"downTime": 300, "bandwidth": 100},
        "taskUuid": task_uuid,
    }
    data.update(extra)
    return MigrationRequest.model_validate(data)


def tid(n: int) -> str:
    return f"aaaaaaaa-0000-4000-8000-{n:012d}"


class Harness:
    def __init__(self, tmp_path: Path, script: Script, **limits: int) -> None:
        self.path = tmp_path / "journal.sqlite"
        self.factory = FakeFactory(script)
        self.limits: dict[str, int] = {"outgoing_limit": 2, **limits}
        self.journal: Journal | None = None
        self.manager: TaskManager | None = None

    async def start(self) -> TaskManager:
        self.journal = await Journal.open(self.path)
        self.manager = TaskManager(
            self.journal,
            self.factory,
            outgoing_limit=self.limits["outgoing_limit"],
        )
        await self.manager.start()
        return self.manager

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop(2.0)
        if self.journal is not None:
            await self.journal.close()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, Script())
    yield h
    await h.stop()


async def finished(task: Task) -> Task:
    async with asyncio.timeout(5):
        await task.wait_finished()
    return task


async def test_success_walks_the_exact_states_and_records_the_result(harness: Harness) -> None:
    manager = await harness.start()
    task, created = await manager.submit(VM_1, request(tid(1)))
    assert created
    await finished(task)
    assert task.state_sequence == HAPPY
    view = task.view()
    assert view["progress"]["percent"] == 100.0
    assert view["downtimeMs"] == 42
    assert view["inventory"]["volumes"][0]["uuid"] == "vol-root"
    assert view["error"] is None
    assert harness.factory.script.calls == [(VM_1, False)]
    record = await harness.journal.get_task(task.uuid)  # type: ignore[union-attr]
    assert record is not None and record.state is S.SUCCEEDED
    assert [row.state for row in record.history] == HAPPY


async def test_engine_failure_ends_failed_with_its_error_code(harness: Harness) -> None:
    harness.factory.script.fail = MigrationFailed("disk on fire", code="AGENT.DISK_ON_FIRE")
    manager = await harness.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await finished(task)
    assert task.state_sequence == [S.PENDING, S.PREPARING, S.COPYING, S.FAILED]
    assert task.error is not None and task.error["code"] == "AGENT.DISK_ON_FIRE"
    assert task.view()["progress"]["percent"] < 100


async def test_engine_bug_ends_failed_as_internal(harness: Harness) -> None:
    harness.factory.script.crash = KeyError("oops")
    manager = await harness.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await finished(task)
    assert task.state is S.FAILED
    assert task.error is not None and task.error["code"] == "AGENT.INTERNAL"
    assert "KeyError" in task.error["details"]


async def test_factory_error_fails_the_task_clearly(harness: Harness) -> None:
    harness.factory.script.factory_error = RuntimeError("no libvirt")
    manager = await harness.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await finished(task)
    assert task.state_sequence == [S.PENDING, S.FAILED]
    assert task.error is not None and task.error["code"] == "AGENT.ENGINE_UNAVAILABLE"
    assert "no libvirt" in task.error["details"]


async def test_cancel_before_start_never_runs_the_engine(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script, outgoing_limit=1)
    try:
        manager = await h.start()
        first, _ = await manager.submit(VM_1, request(tid(1)))
        queued, _ = await manager.submit(VM_2, request(tid(2)))
        await eventually(lambda: first.state is S.COPYING and queued.state is S.QUEUED)
        await manager.cancel(queued.uuid)
        assert queued.state_sequence == [S.PENDING, S.QUEUED, S.CANCELLED]
        assert queued.error is not None and queued.error["code"] == "AGENT.CANCELLED"
        await manager.cancel(queued.uuid)  # idempotent
        assert queued.state_sequence == [S.PENDING, S.QUEUED, S.CANCELLED]
        script.gate.set()  # type: ignore[union-attr]
        await finished(first)
        assert [vm for vm, _ in script.calls] == [VM_1]
    finally:
        await h.stop()


async def test_cancel_running_goes_through_cancelling_and_the_engine_undoes(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script)
    try:
        manager = await h.start()
        task, _ = await manager.submit(VM_1, request(tid(1)))
        await eventually(lambda: task.state is S.COPYING)
        await manager.cancel(task.uuid)
        await manager.cancel(task.uuid)
        await finished(task)
        assert task.state_sequence == [S.PENDING, S.PREPARING, S.COPYING, S.CANCELLING, S.CANCELLED]
        assert script.cancelled == [False]  # a user cancel, not a detach: the engine undoes
        assert (await manager.cancel(task.uuid)) is task
    finally:
        await h.stop()


async def test_cancel_right_after_submit_is_safe(harness: Harness) -> None:
    manager = await harness.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await manager.cancel(task.uuid)
    await finished(task)
    assert task.state in (S.CANCELLED,)
    assert task.state_sequence[0] is S.PENDING


async def test_cancel_unknown_task_is_not_found(harness: Harness) -> None:
    manager = await harness.start()
    with pytest.raises(NotFound):
        await manager.cancel(tid(99))


async def test_outgoing_limit_queues_instead_of_refusing(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script, outgoing_limit=2)
    try:
        manager = await h.start()
        tasks = [(await manager.submit(vm, request(tid(n))))[0] for n, vm in enumerate((VM_1, VM_2, VM_3))]
        await eventually(lambda: sum(t.state is S.COPYING for t in tasks) == 2)
        await asyncio.sleep(0.05)
        (queued,) = [t for t in tasks if t.state is S.QUEUED]
        assert queued.queue is not None and queued.queue["position"] == 1
        assert "2 of 2 outgoing migrations" in queued.queue["reason"]
        assert queued.view()["queue"] == queued.queue
        script.gate.set()  # type: ignore[union-attr]
        for task in tasks:
            await finished(task)
        assert all(t.state is S.SUCCEEDED for t in tasks)
        assert queued.state_sequence == [S.PENDING, S.QUEUED, *HAPPY[1:]]
        assert queued.queue is None
    finally:
        await h.stop()


async def test_the_queue_goes_by_priority_then_first_come_first_served(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script, outgoing_limit=1)
    try:
        manager = await h.start()
        running, _ = await manager.submit(VM_1, request(tid(1)))
        await eventually(lambda: running.state is S.COPYING)
        low, _ = await manager.submit(VM_2, request(tid(2), priority=5))
        first, _ = await manager.submit(VM_3, request(tid(3)))
        second, _ = await manager.submit(VM_4, request(tid(4)))
        urgent, _ = await manager.submit(VM_5, request(tid(5), priority=50))
        order = [urgent, first, second, low]
        await eventually(lambda: all(t.queue is not None for t in order))
        assert [t.queue["position"] for t in order if t.queue] == [1, 2, 3, 4]
        assert all(t.state is S.QUEUED for t in order)
        # Cancelling a queued task takes it out of the queue; the others move up.
        await manager.cancel(first.uuid)
        assert first.state is S.CANCELLED and first.queue is None
        assert first.state_sequence == [S.PENDING, S.QUEUED, S.CANCELLED]
        await eventually(lambda: [t.queue["position"] for t in (urgent, second, low) if t.queue] == [1, 2, 3])
        script.gate.set()  # type: ignore[union-attr]
        for task in (running, urgent, second, low):
            await finished(task)
        started = [vm for vm, _resume in script.calls]
        assert started == [VM_1, VM_5, VM_4, VM_2]
    finally:
        await h.stop()


async def test_the_queue_survives_a_restart_in_the_same_order(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script, outgoing_limit=1)
    manager = await h.start()
    running, _ = await manager.submit(VM_1, request(tid(1)))
    await eventually(lambda: running.state is S.COPYING)
    later, _ = await manager.submit(VM_2, request(tid(2)))
    sooner, _ = await manager.submit(VM_3, request(tid(3), priority=20))
    await eventually(lambda: later.state is S.QUEUED and sooner.state is S.QUEUED)
    await h.stop()

    script2 = Script(gate=asyncio.Event())
    h2 = Harness(tmp_path, script2, outgoing_limit=1)
    try:
        manager2 = await h2.start()
        # The task under way resumes first; the queue is rebuilt from the journal in its order.
        await eventually(lambda: script2.calls == [(VM_1, True)])
        queued = [manager2.get(sooner.uuid), manager2.get(later.uuid)]
        await eventually(lambda: [t.queue["position"] if t.queue else None for t in queued] == [1, 2])
        assert all(t.state is S.QUEUED for t in queued)
        script2.gate.set()  # type: ignore[union-attr]
        for task in queued:
            await finished(task)
        assert script2.calls == [(VM_1, True), (VM_3, False), (VM_2, False)]
        assert queued[1].state_sequence == [S.PENDING, S.QUEUED, *HAPPY[1:]]
    finally:
        await h2.stop()


async def test_one_task_per_vm_and_idempotent_task_uuid(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script)
    try:
        manager = await h.start()
        task, created = await manager.submit(VM_1, request(tid(1)))
        again, created_again = await manager.submit(VM_1, request(tid(1)))
        assert created and not created_again and again is task
        with pytest.raises(Conflict) as busy:
            await manager.submit(VM_1, request(tid(2)))
        assert busy.value.extra["taskUuid"] == task.uuid
        with pytest.raises(Conflict):
            await manager.submit(VM_2, request(tid(1)))  # same taskUuid, other VM
        with pytest.raises(Conflict):
            await manager.submit(VM_1, request(tid(1), allowPostCopy=True))  # same taskUuid, other request
        script.gate.set()  # type: ignore[union-attr]
        await finished(task)
        second, created = await manager.submit(VM_1, request(tid(2)))  # the VM is free again
        assert created
        await finished(second)
    finally:
        await h.stop()


async def test_retune_wakes_the_engine_and_is_journalled(tmp_path: Path) -> None:
    script = Script(wait_tuning=True)
    h = Harness(tmp_path, script)
    try:
        manager = await h.start()
        task, _ = await manager.submit(VM_1, request(tid(1)))
        await eventually(lambda: task.state is S.COPYING and task.tracker.snapshot().bytes_done == 2000)
        await manager.retune(task.uuid, Tuning(bandwidth=7))
        await finished(task)
        assert script.tuned == [(7 * 1024 * 1024, 300)]
        record = await h.journal.get_task(task.uuid)  # type: ignore[union-attr]
        assert record is not None and record.tuning == {"bandwidth": 7, "downTime": 300}
        with pytest.raises(Conflict):
            await manager.retune(task.uuid, Tuning(downTime=10))
    finally:
        await h.stop()


async def test_request_timeout_fails_the_task_after_the_engine_undid(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script)
    try:
        manager = await h.start()
        task, _ = await manager.submit(VM_1, request(tid(1), timeout=0.2))
        await finished(task)
        assert task.state is S.FAILED
        assert task.error is not None and task.error["code"] == "AGENT.TIMEOUT"
        assert script.cancelled == [False]
    finally:
        await h.stop()


async def test_stop_detaches_and_a_new_manager_resumes_from_the_journal(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script)
    manager = await h.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    queued_for_later, _ = await manager.submit(VM_2, request(tid(2)))
    await eventually(lambda: task.state is S.COPYING and queued_for_later.state is S.COPYING)
    await h.stop()
    assert script.cancelled == [True, True]  # detaching: the engines leave their jobs alone
    with pytest.raises(ServiceStopping):
        await manager.submit(VM_3, request(tid(3)))

    script2 = Script()
    h2 = Harness(tmp_path, script2)
    try:
        manager2 = await h2.start()
        resumed = manager2.get(task.uuid)
        assert resumed.resume_data == {"step": "prepared"}
        await finished(resumed)
        await finished(manager2.get(queued_for_later.uuid))
        assert sorted(script2.calls) == [(VM_1, True), (VM_2, True)]
        assert resumed.state_sequence == [
            S.PENDING,
            S.PREPARING,
            S.COPYING,
            S.SWITCHING,
            S.VERIFYING,
            S.SUCCEEDED,
        ]
        assert script2.resume_data_seen == [{"step": "prepared"}, {"step": "prepared"}]
    finally:
        await h2.stop()


async def test_a_resumed_engine_that_walks_its_last_states_again_does_not_fail_the_task(
    tmp_path: Path,
) -> None:
    """Seen in the lab: the agent stopped while the cross-host commit was VERIFYING; the resumed commit
    announced SWITCHING again, the recorder refused to go back, and a move whose VM ran on the destination
    ended FAILED (AGENT.INVALID_TRANSITION)."""
    script = Script(verify_gate=asyncio.Event())
    h = Harness(tmp_path, script)
    manager = await h.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await eventually(lambda: task.state is S.VERIFYING)
    await h.stop()

    h2 = Harness(tmp_path, Script(resume_at_switch=True))
    try:
        manager2 = await h2.start()
        resumed = await finished(manager2.get(task.uuid))
        assert resumed.state is S.SUCCEEDED, resumed.error
        assert resumed.state_sequence == HAPPY
    finally:
        await h2.stop()


async def test_a_fresh_engine_still_cannot_go_back(harness: Harness) -> None:
    """Outside a resume, an engine that enters an earlier state is a bug, and the task says so."""
    harness.factory.script.resume_at_switch = True
    manager = await harness.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await finished(task)
    assert task.state is S.SUCCEEDED  # a fresh run does not take the resume path: the happy walk

    class Backwards(FakeEngine):
        async def run(self, ctx: Any) -> list[dict[str, Any]]:
            await ctx.enter(S.COPYING)
            await ctx.enter(S.PREPARING)
            return []

    harness.factory.engine = Backwards
    task2, _ = await manager.submit(VM_2, request(tid(2)))
    await finished(task2)
    assert task2.state is S.FAILED and task2.error is not None
    assert task2.error["code"] == "AGENT.INVALID_TRANSITION", task2.error


async def test_restart_keeps_finished_tasks_for_views_and_idempotency(tmp_path: Path) -> None:
    h = Harness(tmp_path, Script())
    manager = await h.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await finished(task)
    await h.stop()

    h2 = Harness(tmp_path, Script())
    try:
        manager2 = await h2.start()
        again, created = await manager2.submit(VM_1, request(tid(1)))
        assert not created and again.state is S.SUCCEEDED
        assert again.view()["progress"]["percent"] == 100.0
        assert again.view()["states"] == task.view()["states"]
        assert h2.factory.script.calls == []
    finally:
        await h2.stop()


async def test_pending_task_found_at_start_runs_without_resume(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script, outgoing_limit=1)
    manager = await h.start()
    await manager.submit(VM_1, request(tid(1)))
    waiting, _ = await manager.submit(VM_2, request(tid(2)))
    await eventually(lambda: len(script.calls) == 1)
    await h.stop()

    h2 = Harness(tmp_path, Script(), outgoing_limit=1)
    try:
        manager2 = await h2.start()
        await finished(manager2.get(waiting.uuid))
        assert (VM_2, False) in h2.factory.script.calls
        assert (VM_1, True) in h2.factory.script.calls
    finally:
        await h2.stop()


async def test_cancelling_task_found_at_start_is_undone_by_its_engine(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script)
    manager = await h.start()
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await eventually(lambda: task.state is S.COPYING)
    # Journal CANCELLING the way cancel() does, then stop before the engine could finish undoing.
    async with task.lock:
        await manager.recorder.transition_locked(task, S.CANCELLING, "cancel requested")
    await h.stop()

    script2 = Script(gate=asyncio.Event())
    h2 = Harness(tmp_path, script2)
    try:
        manager2 = await h2.start()
        resumed = manager2.get(task.uuid)
        await finished(resumed)
        assert resumed.state_sequence[-2:] == [S.CANCELLING, S.CANCELLED]
        assert script2.calls == [(VM_1, True)] and script2.cancelled == [False]
    finally:
        await h2.stop()


async def test_listeners_see_changes_and_cannot_break_a_task(harness: Harness) -> None:
    manager = await harness.start()
    seen: list[str] = []

    def bad_listener(task: Task, change: Any) -> None:
        raise RuntimeError("listener bug")

    manager.add_listener(bad_listener)
    manager.add_listener(lambda task, change: seen.append(change.kind.value))
    task, _ = await manager.submit(VM_1, request(tid(1)))
    await finished(task)
    assert task.state is S.SUCCEEDED
    await eventually(lambda: seen[-1] == "finished")
    assert seen[0] == "created"
    assert "progress" in seen and "details" in seen


async def test_cancel_of_a_resumed_task_still_waiting_for_its_slot(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    h = Harness(tmp_path, script)
    manager = await h.start()
    first, _ = await manager.submit(VM_1, request(tid(1)))
    second, _ = await manager.submit(VM_2, request(tid(2)))
    await eventually(lambda: first.state is S.COPYING and second.state is S.COPYING)
    await h.stop()

    script2 = Script(gate=asyncio.Event())
    h2 = Harness(tmp_path, script2, outgoing_limit=1)
    try:
        manager2 = await h2.start()
        await eventually(lambda: len(script2.calls) == 1)
        (running_vm, _) = script2.calls[0]
        waiting = manager2.get(second.uuid if running_vm == VM_1 else first.uuid)
        await manager2.cancel(waiting.uuid)
        assert waiting.state is S.CANCELLING  # its engine must still undo what the first run left
        script2.gate.set()  # type: ignore[union-attr]
        await finished(waiting)
        assert waiting.state_sequence[-3:] == [S.COPYING, S.CANCELLING, S.CANCELLED]
        assert len(script2.calls) == 2 and script2.cancelled == [False]
    finally:
        await h2.stop()


async def test_a_retune_before_the_engine_waits_is_not_lost(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event(), wait_tuning=True)
    h = Harness(tmp_path, script)
    try:
        manager = await h.start()
        task, _ = await manager.submit(VM_1, request(tid(1)))
        await eventually(lambda: task.state is S.COPYING)
        await manager.retune(task.uuid, Tuning(downTime=900))  # the engine is still copying, not waiting
        script.gate.set()  # type: ignore[union-attr]
        await finished(task)
        assert script.tuned == [(100 * 1024 * 1024, 900)]
    finally:
        await h.stop()
