"""A cancel racing the switch, with the real task manager and journal (issue 8).

The engines end the steps past the point of no return (pivots begun, the VM arrived on the destination)
with ``run_past_cancel`` and announce states with ``announce``: a cancel landing there must end the task
SUCCEEDED with a ``cancelTooLate`` note (the truth: the move happened), never CANCELLED nor FAILED with an
invalid transition; a cancel before that point still ends it CANCELLED.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from service_fakes import STORAGE_A, VM_1, eventually

from agent.errors import MigrationFailed
from agent.migration.engine import Engine, TaskContext, announce, run_past_cancel
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState as S
from agent.tasks.journal import Journal
from agent.tasks.manager import TaskManager

TASK = "bbbbbbbb-0000-4000-8000-000000000001"


class SwitchingEngine:
    """COPYING until ``copied`` is set, then a switch that waits for ``switch_may_end`` past no return."""

    name = "switching"

    def __init__(self) -> None:
        self.copied = asyncio.Event()
        self.switch_started = asyncio.Event()
        self.switch_may_end = asyncio.Event()
        self.undone = False
        self.verified = False

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        await ctx.enter(S.PREPARING)
        await ctx.enter(S.COPYING)
        try:
            await self.copied.wait()
            await ctx.enter(S.SWITCHING)
        except asyncio.CancelledError:
            self.undone = True
            raise
        return await run_past_cancel(ctx, self._switch_and_verify(ctx))

    async def _switch_and_verify(self, ctx: TaskContext) -> list[dict[str, Any]]:
        self.switch_started.set()
        await self.switch_may_end.wait()
        await announce(ctx, S.VERIFYING)
        self.verified = True
        return [{"uuid": "vol", "installPath": "/dst/vol.qcow2"}]


async def manager_with(tmp_path: Path, engine: SwitchingEngine) -> tuple[TaskManager, Journal]:
    def factory(request: MigrationRequest, vm_uuid: str, resume: bool) -> Engine:
        return engine

    journal = await Journal.open(tmp_path / "journal.sqlite")
    manager = TaskManager(journal, factory, outgoing_limit=1)
    await manager.start()
    request = MigrationRequest.model_validate(
        {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_A}, "taskUuid": TASK}
    )
    await manager.submit(VM_1, request)
    return manager, journal


async def test_cancel_during_the_switch_ends_succeeded_with_the_truth(tmp_path: Path) -> None:
    engine = SwitchingEngine()
    manager, journal = await manager_with(tmp_path, engine)
    try:
        engine.copied.set()
        await asyncio.wait_for(engine.switch_started.wait(), 5)
        task = await manager.cancel(TASK)
        assert task.state is S.CANCELLING
        await manager.cancel(TASK)  # twice: still absorbed
        engine.switch_may_end.set()
        await eventually(lambda: manager.get(TASK).state.final)
        task = manager.get(TASK)
        assert task.state is S.SUCCEEDED, task.error
        assert engine.verified and not engine.undone
        assert "cancelTooLate" in task.details
        assert [s.state for s in task.history] == [
            S.PENDING,
            S.PREPARING,
            S.COPYING,
            S.SWITCHING,
            S.CANCELLING,
            S.SUCCEEDED,
        ]
        record = await journal.get_task(TASK)
        assert record is not None and record.state is S.SUCCEEDED
    finally:
        await manager.stop(2.0)
        await journal.close()


async def test_cancel_before_the_switch_still_undoes(tmp_path: Path) -> None:
    engine = SwitchingEngine()
    manager, journal = await manager_with(tmp_path, engine)
    try:
        await eventually(lambda: manager.get(TASK).state is S.COPYING)
        await manager.cancel(TASK)
        await eventually(lambda: manager.get(TASK).state.final)
        assert manager.get(TASK).state is S.CANCELLED
        assert engine.undone and not engine.switch_started.is_set()
    finally:
        await manager.stop(2.0)
        await journal.close()


async def test_switch_errors_are_not_swallowed(tmp_path: Path) -> None:
    class Failing(SwitchingEngine):
        async def _switch_and_verify(self, ctx: TaskContext) -> list[dict[str, Any]]:
            self.switch_started.set()
            await self.switch_may_end.wait()
            raise MigrationFailed("pivot failed", code="AGENT.PIVOT_FAILED")

    engine = Failing()
    manager, journal = await manager_with(tmp_path, engine)
    try:
        engine.copied.set()
        await asyncio.wait_for(engine.switch_started.wait(), 5)
        await manager.cancel(TASK)
        engine.switch_may_end.set()
        await eventually(lambda: manager.get(TASK).state.final)
        task = manager.get(TASK)
        assert task.state is S.FAILED and task.error is not None
        assert task.error["code"] == "AGENT.PIVOT_FAILED"
    finally:
        await manager.stop(2.0)
        await journal.close()
