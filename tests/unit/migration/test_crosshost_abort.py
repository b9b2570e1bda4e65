"""The bounded wait for libvirt's migration call after an abort (the lab's cut-link test drives it for real:
libvirt 9.0 can keep an aborted migration job forever after a link cut)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.errors import MigrationFailed, VirtError
from agent.migration.crosshost import CrossHostEngine, migrate

VM = "0f6b2c1e-8d7a-4c39-9a57-3e2d1c0b9a88"
OTHER_HOST = "7d3c0a52-6c1e-4b7e-9f3a-2b1d0c9e8f71"


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


def _engine(host: FakeHost | None, wedged: set[str] | None = None) -> CrossHostEngine:
    return CrossHostEngine(host, None, None, wedged=wedged)  # type: ignore[arg-type]


def _migration(host: FakeHost, wedged: set[str]) -> migrate.Migration:
    """The migration of one task; ``wedged`` is the agent's set, shared by every task's engine."""
    return migrate.Migration(host, None, _ctx(), tick_s=0.25, wedged=wedged)  # type: ignore[arg-type]


def _ctx() -> Any:
    return SimpleNamespace(vm_uuid=VM, log=logging.getLogger("test"))


@pytest.fixture(autouse=True)
def _short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrate, "ABORT_GRACE_S", 0.5)
    monkeypatch.setattr(migrate, "ABORT_REPEAT_S", 0.1)


async def test_a_job_that_ends_after_a_repeated_abort_is_awaited() -> None:
    migration: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    host = FakeHost(migration, ends_after_aborts=2)
    wedged: set[str] = set()

    assert await _migration(host, wedged).wait_after_abort(migration) is True

    assert host.aborts == 2
    assert wedged == set()


async def test_a_wedged_job_is_left_behind_and_remembered(caplog: pytest.LogCaptureFixture) -> None:
    migration: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    host = FakeHost(migration, ends_after_aborts=None)
    wedged: set[str] = set()

    assert await _migration(host, wedged).wait_after_abort(migration) is False

    assert host.aborts >= 3  # repeated while waiting
    assert wedged == {VM}
    assert any("Restart libvirtd" in r.getMessage() for r in caplog.records)
    migration.set_result(None)  # libvirt lets go at last: logged, not raised
    await asyncio.sleep(0)
    assert any("returned at last" in r.getMessage() for r in caplog.records)


async def test_a_wedged_vm_is_refused_by_the_next_task_until_libvirt_lets_go() -> None:
    # Issue 21: the set died with each engine (one per task), so the VM could be migrated again at once,
    # against the error's own advice. The agent's factory hands every engine one set.
    migration: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    shared: set[str] = set()
    assert (
        await _migration(FakeHost(migration, ends_after_aborts=None), shared).wait_after_abort(migration)
        is False
    )

    second = _engine(None, shared)
    ctx = SimpleNamespace(vm_uuid=VM, resume_data=None, log=logging.getLogger("test"))
    with pytest.raises(MigrationFailed) as refused:
        await second.run(ctx)  # type: ignore[arg-type]
    assert refused.value.code == "AGENT.MIGRATION_JOB_WEDGED"
    assert "Restart libvirtd" in str(refused.value.details)

    migration.set_result(None)  # the wedged call returned at last: the VM may move again
    await asyncio.sleep(0)
    assert shared == set()


def test_the_agents_engines_share_one_wedged_set(tmp_path: Path) -> None:
    from service_fakes import STORAGE_A, make_config

    from agent.migration.factory import ByVmState, make_engine_factory
    from agent.migration.request import MigrationRequest

    factory = make_engine_factory(make_config(tmp_path, insecure_transport=True), None)  # type: ignore[arg-type]
    request = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {
                "dstPrimaryStorageUuid": STORAGE_A,
                "dstHostUuid": OTHER_HOST,
            },
            "dstHost": {
                "uuid": OTHER_HOST,
                "agentUrl": "https://192.0.2.12:7070",
            },
        }
    )
    engines = [factory(request, VM, False) for _ in range(2)]
    lives = [e.live for e in engines if isinstance(e, ByVmState)]
    assert len(lives) == 2 and all(isinstance(e, CrossHostEngine) for e in lives)
    assert lives[0].wedged is lives[1].wedged  # type: ignore[attr-defined]
