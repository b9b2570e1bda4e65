"""Settling a cross-host task whose VM stayed on this host: the verdict says where the VM is at the end."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from agent.errors import MigrationFailed
from agent.migration import placement
from agent.migration.crosshost import settle
from agent.migration.crosshost.work import CrossHostWork
from agent.migration.engine import Step
from agent.migration.peer.wire import Prepared
from agent.migration.plan import MigrationPlan
from agent.virt.states import DomainState

VM = "0f6b2c1e-8d7a-4c39-9a57-3e2d1c0b9a88"
PREPARED = {
    "migrationId": "11111111-2222-4333-8444-555555555599",
    "libvirtUri": "qemu+tls://hostB/system",
    "migrationUri": "tcp://hostB",
    "disks": [{"target": "vda", "top": "/dst/vm/top.qcow2"}],
}


def work() -> CrossHostWork:
    """A move journalled at MIGRATING (no disks: the steps that use them are replaced here)."""
    plan = MigrationPlan(VM, "b" * 32, (), ())
    return CrossHostWork(plan=plan, step=Step.MIGRATING, prepared=Prepared.model_validate(PREPARED))


class Host:
    def __init__(self, state: DomainState) -> None:
        self.state = state

    async def domain_state(self, vm_uuid: str) -> DomainState:
        return self.state


@pytest.fixture
def crashing(monkeypatch: pytest.MonkeyPatch) -> tuple[Host, list[str]]:
    """A host whose VM runs when the migration's end is looked at, and has crashed once the destination
    was cleaned up; the calls made, in order."""
    calls: list[str] = []

    async def put_back_here(host: Any, ctx: Any, metas: Any) -> None:
        calls.append("put back")

    async def abort_remote(ctx: Any, peer: Any) -> None:
        calls.append("destination cleaned")
        host.state = DomainState.CRASHED  # QEMU died a moment after the failed switchover

    async def locate(*args: Any, **kw: Any) -> tuple[placement.Place, DomainState]:
        return placement.place_of(DomainState.RUNNING, DomainState.UNDEFINED), DomainState.RUNNING

    host = Host(DomainState.RUNNING)
    monkeypatch.setattr(settle.snapmeta, "put_back_here", put_back_here)
    monkeypatch.setattr(settle, "abort_remote", abort_remote)
    monkeypatch.setattr(settle, "locate", locate)
    return host, calls


async def test_a_vm_that_died_after_the_failed_switchover_is_not_reported_running_here(
    crashing: tuple[Host, list[str]],
) -> None:
    # Seen in the lab (QEMU 7.2): the link cut during the switchover, the guest resumed on the source, and
    # QEMU aborted on its next write to a deactivated disk; the task said "the VM runs on the source".
    host, calls = crashing
    ctx = SimpleNamespace(vm_uuid=VM, log=logging.getLogger("test"))
    failure = MigrationFailed("the link broke during the switchover")
    with pytest.raises(MigrationFailed) as failed:
        await settle._settle_steps(host, ctx, None, work(), failure, wedged=False)  # type: ignore[arg-type]
    assert failed.value.code == "AGENT.VM_STOPPED"
    assert "crashed" in failed.value.description
    assert calls == ["put back", "destination cleaned"]


async def test_a_vm_still_running_here_gets_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    async def nothing(*args: Any) -> None:
        return None

    async def locate(*args: Any, **kw: Any) -> tuple[placement.Place, DomainState]:
        return placement.place_of(DomainState.RUNNING, DomainState.UNDEFINED), DomainState.RUNNING

    monkeypatch.setattr(settle.snapmeta, "put_back_here", nothing)
    monkeypatch.setattr(settle, "abort_remote", nothing)
    monkeypatch.setattr(settle, "locate", locate)
    ctx = SimpleNamespace(vm_uuid=VM, log=logging.getLogger("test"))
    failure = MigrationFailed("the link broke")
    with pytest.raises(MigrationFailed) as failed:
        await settle._settle_steps(
            Host(DomainState.RUNNING),  # type: ignore[arg-type]
            ctx,  # type: ignore[arg-type]
            None,
            work(),
            failure,
            wedged=False,
        )
    assert failed.value is failure
