"""The host-wide budget's service (``tasks.hostbudget.HostBudget``): who shares it, when it is split again,
and the order in which new shares reach the running streams."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from service_fakes import STORAGE_A, VM_1, VM_2, VM_3

from agent.migration.request import MigrationRequest
from agent.tasks.hostbudget import HostBudget, planned
from agent.tasks.task import Task

MiB = 1024 * 1024


class Limits:
    """What the budget needs of a ``LiveLimits``: its host share and budget, and ``retune``."""

    def __init__(self, calls: list[tuple[str, int | None]], name: str, cap: int | None = None) -> None:
        self.calls, self.name, self.cap = calls, name, cap
        self.host_share: int | None = None
        self.effective = SimpleNamespace(disks={"vda": 0})  # one disk mirror

    @property
    def budget(self) -> int | None:
        given = [b for b in (self.cap, self.host_share) if b]
        return min(given) if given else None

    async def retune(self, *, host_share: int | None) -> dict[str, Any]:
        await asyncio.sleep(0)
        self.host_share = host_share
        self.calls.append((self.name, host_share))
        return {}


def task(n: int, vm: str, *, priority: int = 10, cap: int | None = None, same_host: bool = False) -> Task:
    body: dict[str, Any] = {
        "primaryStorageMigrateVm": {
            "dstPrimaryStorageUuid": STORAGE_A,
            "dstHostUuid": "" if same_host else STORAGE_A,
        },
        "migrateVm": {"bandwidth": cap},
        "priority": priority,
        "taskUuid": f"aaaaaaaa-0000-4000-8000-{n:012d}",
    }
    return Task.new(f"t{n}", vm, MigrationRequest.model_validate(body), 0.0)


def budget_of(outgoing: int | None) -> HostBudget:
    return HostBudget(outgoing, crosses_link=lambda t: bool(t.request.primaryStorageMigrateVm.dstHostUuid))


async def settled(budget: HostBudget) -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_running_cross_host_tasks_share_it_and_it_is_split_again_as_they_come_and_go() -> None:
    budget = budget_of(30 * MiB)
    # The wire's framing and a buffer per mirror and window set aside (a task not running yet: one mirror).
    assert 0.5 * 30 * MiB < planned(30 * MiB, 2) < planned(30 * MiB, 1) < 30 * MiB - 3 * MiB
    whole = planned(30 * MiB, 1)
    a, b, local = task(1, VM_1), task(2, VM_2, priority=20), task(3, VM_3, same_host=True)
    budget.join(a)
    assert a.host_share == whole
    budget.join(b)
    budget.join(local)  # a same-host move does not cross the link
    assert local.host_share is None and local.uuid not in budget.shares
    assert a.host_share is not None and b.host_share is not None
    assert abs(b.host_share - 2 * a.host_share) <= 0.1 * a.host_share
    assert a.host_share + b.host_share <= planned(30 * MiB, 2)
    # A retune of a task's own cap bounds its share at once.
    a.apply_tuning(2, None, 1.0)
    budget.task_changed(a)
    assert a.host_share == 2 * MiB and b.host_share == planned(30 * MiB, 2) - 2 * MiB
    budget.leave(a)
    assert a.host_share is None and b.host_share == whole
    budget.set_outgoing(None)
    assert b.host_share is None and budget.view()["outgoing"]["bandwidth"] is None
    await budget.close()


async def test_new_shares_reach_the_running_streams_the_shrinking_ones_first() -> None:
    calls: list[tuple[str, int | None]] = []
    budget = budget_of(40 * MiB)
    a, b = task(1, VM_1), task(2, VM_2)
    a.live_limits = Limits(calls, "a")  # type: ignore[assignment]
    budget.join(a)
    await settled(budget)
    assert calls == [("a", planned(40 * MiB, 1))]
    b.live_limits = Limits(calls, "b")  # type: ignore[assignment]
    budget.join(b)
    await settled(budget)
    # b's share is taken from a: a is lowered before b starts at its share.
    assert [name for name, _ in calls[1:]] == ["a", "b"]
    budget.leave(b)
    await settled(budget)
    assert calls[-1] == ("a", planned(40 * MiB, 1))
    await budget.close()
