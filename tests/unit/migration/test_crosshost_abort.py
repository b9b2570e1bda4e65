"""The bounded wait for libvirt's migration call after an abort (the lab's cut-link test drives it for real:
libvirt 9.0 can keep an aborted migration job forever after a link cut)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from agent.errors import VirtError
from agent.migration.crosshost import CrossHostEngine, migrate

VM = "0f6b2c1e-8d7a-4c39-9a57-3e2d1c0b9a88"


class FakeHost:
    def __init__(self, migration: asyncio.Future[None], *, ends_after_aborts: int | None) -> None:
        self.migration = migration
        self.aborts = 0
        self.ends_after_aborts = ends_after_aborts

    async def abort_job(self, vm_uuid: str) -> None:
        assert vm_uuid == VM
        self.aborts += 1
        if self.aborts == self.ends_after_aborts:
            self.migration.set_exception(VirtError("operation aborted: migration out: canceled by client"))


def _engine(host: FakeHost) -> CrossHostEngine:
    return CrossHostEngine(host, None, None)  # type: ignore[arg-type]


def _ctx() -> Any:
    return SimpleNamespace(vm_uuid=VM, log=logging.getLogger("test"))


@pytest.fixture(autouse=True)
def _short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrate, "ABORT_GRACE_S", 0.5)
    monkeypatch.setattr(migrate, "ABORT_REPEAT_S", 0.1)


async def test_a_job_that_ends_after_a_repeated_abort_is_awaited() -> None:
    migration: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    host = FakeHost(migration, ends_after_aborts=2)
    engine = _engine(host)

    assert await engine._wait_after_abort(_ctx(), migration) is True

    assert host.aborts == 2
    assert engine.wedged == set()


async def test_a_wedged_job_is_left_behind_and_remembered(caplog: pytest.LogCaptureFixture) -> None:
    migration: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    host = FakeHost(migration, ends_after_aborts=None)
    engine = _engine(host)

    assert await engine._wait_after_abort(_ctx(), migration) is False

    assert host.aborts >= 3  # repeated while waiting
    assert engine.wedged == {VM}
    assert any("Restart libvirtd" in r.getMessage() for r in caplog.records)
    migration.set_result(None)  # libvirt lets go at last: logged, not raised
    await asyncio.sleep(0)
    assert any("returned at last" in r.getMessage() for r in caplog.records)
