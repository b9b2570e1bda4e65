"""The engine skeleton's runner (agent/migration/runner.py): one deadline, every verdict, and the rule that
turns where the VM is into the ending. Real asyncio, fake engines (pure logic)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import pytest

from agent.errors import AgentError, MigrationFailed
from agent.migration import runner
from agent.migration.engine import Deadline
from agent.migration.placement import Place, Settlement, place_of, settle
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState


class Ctx:
    """Just enough of a TaskContext for the runner."""

    def __init__(self, timeout: float | None = None, created: float | None = None) -> None:
        body: dict[str, Any] = {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": "0" * 32}}
        if timeout is not None:
            body["timeout"] = timeout
        self.request = MigrationRequest.model_validate(body)
        self.created = time.time() if created is None else created
        self.notes: dict[str, Any] = {}
        self.cancel_requested = False
        self.detaching = False
        self.log = logging.LoggerAdapter(logging.getLogger("test"), {})

    @property
    def deadline(self) -> Deadline | None:
        t = self.request.timeout
        return None if t is None else Deadline(self.created + t)

    def note(self, key: str, value: Any) -> None:
        self.notes[key] = value


class Engine:
    name = "fake"

    def __init__(self, work: Any) -> None:
        self.work = work

    async def run(self, ctx: Any) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.work(ctx)
        return result

    def explain_deadline(self) -> tuple[str, Mapping[str, Any]] | None:
        return ("pre-copy did not converge", {"working_set_bytes": 42})


async def test_success_is_succeeded_with_the_inventory() -> None:
    async def work(ctx: Any) -> list[dict[str, Any]]:
        return [{"uuid": "v"}]

    verdict = await runner.run(Engine(work), Ctx())  # type: ignore[arg-type]
    assert verdict.state is TaskState.SUCCEEDED and verdict.inventory == [{"uuid": "v"}]
    assert verdict.error is None


async def test_an_engine_error_is_failed_with_its_code() -> None:
    async def work(ctx: Any) -> list[dict[str, Any]]:
        raise MigrationFailed("no", code="AGENT.MIGRATION_FAILED")

    verdict = await runner.run(Engine(work), Ctx())  # type: ignore[arg-type]
    assert verdict.state is TaskState.FAILED and verdict.error is not None
    assert verdict.error.code == "AGENT.MIGRATION_FAILED" and verdict.detail == "AGENT.MIGRATION_FAILED"


async def test_the_deadline_cancels_the_engine_which_undoes_and_the_task_times_out() -> None:
    undone = []

    async def work(ctx: Any) -> list[dict[str, Any]]:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            undone.append(True)  # an engine undoes its work on the cancel, then lets it go on
            raise
        return []

    started = time.monotonic()
    verdict = await runner.run(Engine(work), Ctx(timeout=0.2))  # type: ignore[arg-type]
    assert time.monotonic() - started < 5
    assert undone == [True]
    assert verdict.state is TaskState.FAILED and verdict.error is not None
    assert verdict.error.code == "AGENT.TIMEOUT"
    assert "did not converge" in verdict.error.description  # the engine's explanation
    assert verdict.error.extra["figures"] == {"working_set_bytes": 42}


async def test_a_deadline_that_passed_before_a_restart_still_holds() -> None:
    """Created long ago with a short timeout: the resumed run gets no fresh budget."""

    async def work(ctx: Any) -> list[dict[str, Any]]:
        await asyncio.sleep(60)
        return []

    verdict = await runner.run(Engine(work), Ctx(timeout=10, created=time.time() - 3600))  # type: ignore[arg-type]
    assert verdict.error is not None and verdict.error.code == "AGENT.TIMEOUT"


async def test_a_switch_found_done_at_the_deadline_is_succeeded_with_a_note() -> None:
    async def work(ctx: Any) -> list[dict[str, Any]]:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()  # the VM had switched over: the engine finishes the move instead
        return [{"uuid": "moved"}]

    ctx = Ctx(timeout=0.2)
    verdict = await runner.run(Engine(work), ctx)  # type: ignore[arg-type]
    assert verdict.state is TaskState.SUCCEEDED and verdict.inventory == [{"uuid": "moved"}]
    assert "deadlinePassed" in ctx.notes


async def test_a_users_cancel_is_cancelled() -> None:
    ctx = Ctx()

    async def work(c: Any) -> list[dict[str, Any]]:
        await asyncio.sleep(60)
        return []

    task = asyncio.ensure_future(runner.run(Engine(work), ctx))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    ctx.cancel_requested = True
    task.cancel()
    verdict = await task
    assert verdict.state is TaskState.CANCELLED and verdict.error is not None
    assert verdict.error.code == "AGENT.CANCELLED"


async def test_a_stopping_agent_is_not_an_ending() -> None:
    ctx = Ctx()

    async def work(c: Any) -> list[dict[str, Any]]:
        await asyncio.sleep(60)
        return []

    task = asyncio.ensure_future(runner.run(Engine(work), ctx))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    ctx.detaching = True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_unexpected_exception_is_an_internal_error() -> None:
    async def work(ctx: Any) -> list[dict[str, Any]]:
        raise KeyError("x")

    verdict = await runner.run(Engine(work), Ctx())  # type: ignore[arg-type]
    assert verdict.state is TaskState.FAILED and isinstance(verdict.error, AgentError)
    assert "KeyError" in (verdict.error.details or "")


@pytest.mark.parametrize(
    ("source", "destination", "place"),
    [
        ("running", "paused", Place.SOURCE),  # an incoming domain is paused until it switches over
        ("running", "undefined", Place.SOURCE),
        ("undefined", "running", Place.DESTINATION),
        ("shutoff", "running", Place.DESTINATION),  # the destination's word wins when it runs there
        (None, "running", Place.DESTINATION),  # this host's libvirtd silent, the destination says running
        ("undefined", "shutoff", Place.DESTINATION),  # defined there only: it arrived, then stopped
        ("shutoff", None, Place.SOURCE),
        ("undefined", None, Place.UNKNOWN),
        (None, None, Place.UNKNOWN),
        (None, "undefined", Place.UNKNOWN),
        ("undefined", "undefined", Place.UNKNOWN),
    ],
)
def test_where_the_vm_is(source: str | None, destination: str | None, place: Place) -> None:
    assert place_of(source, destination) is place


def test_the_ending_follows_the_place() -> None:
    assert settle(Place.DESTINATION) is Settlement.COMMIT
    assert settle(Place.SOURCE) is Settlement.ROLL_BACK
    assert settle(Place.UNKNOWN) is Settlement.KEEP_ALL
