"""An agent restarted while libvirt migrates takes over what QEMU runs with (issue 21): the allowed downtime
is read back, never set back to the schedule's start. Before this, the resumed controller's ``start`` put
the downtime back to 50 ms in the middle of the memory phase, a change the running migration never asked
for (the `auto` strategy's guest deaths after agent kills were seen with exactly that sequence)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from faultkit import assert_no_loss, finish, kill_agent, lab_restored, start_agent
from labtools import Guest, Lab, LabHost

from labkit.agents import agent_client, task_view
from labkit.bodies import to_host_body

pytestmark = pytest.mark.lab
__all__ = ["lab_restored"]

#: What an earlier life of the agent had allowed (any value the schedule would not start at).
EARLIER_MS = 777


async def test_a_restarted_agent_keeps_the_downtime_qemu_runs_with(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(memory_mib=128, dirty_mib_s=2)
    guest.wait_for_acks(5)
    # 4 MiB/s: the first memory pass alone takes about 30 s, long enough to restart the agent inside it.
    body = to_host_body(dst, strategy="auto", downTime=2000, bandwidth=4, timeout=600)
    async with agent_client(lab_agents, src) as agent:
        task = dict(await agent.start_migration(guest.uuid, body))
    task_uuid = task["taskUuid"]
    await _until_state(lab_agents, src, task_uuid, "CONVERGING")
    src.virsh("migrate-setmaxdowntime", guest.name, str(EARLIER_MS))
    try:
        kill_agent(lab_agents, src)
        await asyncio.sleep(2)
    finally:
        start_agent(lab_agents, src)

    # Watch QEMU's limit from outside while the restarted agent takes over (and a few ticks more).
    seen: list[int] = []
    view = await task_view(lab_agents, src, task_uuid)
    until = time.monotonic() + 12
    while time.monotonic() < until and "Outgoing migration" in src.virsh(
        "domjobinfo", guest.name, check=False
    ):
        seen.append(int(src.virsh("migrate-getmaxdowntime", guest.name).split()[0]))
        view = await task_view(lab_agents, src, task_uuid)
        await asyncio.sleep(0.3)
    assert len(seen) >= 10, f"the migration ended before it could be watched: {view['state']}"
    assert min(seen) >= EARLIER_MS, f"the restarted agent set the downtime back: {seen}"
    notes = [d["message"] for d in view["details"].get("decisions", [])]
    assert any(f"carrying on with {EARLIER_MS} ms allowed" in m for m in notes), notes

    async with agent_client(lab_agents, src) as agent:
        await agent.patch_task(task_uuid, bandwidth=200)  # let it finish
    run = await finish(lab_agents, src, task_uuid, within_s=300)
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert guest.where() == {"hostB": "running"}
    assert_no_loss(guest)


async def _until_state(lab: Lab, host: LabHost, task_uuid: str, state: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        view = await task_view(lab, host, task_uuid)
        if view["state"] == state:
            return
        assert view["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"), view.get("error")
        assert time.monotonic() < deadline, f"never {state}: {view['state']}"
        await asyncio.sleep(0.2)


def _migrating(host: LabHost, guest: Guest) -> bool:
    return "Outgoing migration" in host.virsh("domjobinfo", guest.name, check=False)
