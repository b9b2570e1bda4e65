"""Live limits (issue 27): a PATCH of a running move's bandwidth takes effect in QEMU within 3 s, lifting a
cap or lowering one, in the disk phase (COPYING) and the memory phase (CONVERGING), on one host and across
hosts, measured from outside the agent (the source QEMU's counters, the destination files' growth); the
move then ends SUCCEEDED with every acknowledged write. Each move takes several PATCHes to stay cheap.

A capped rate must be within 10 % of the new cap over the window [PATCH + 1 s, PATCH + 3 s]; uncapped, at
least 5 x the old cap from the PATCH until the transfer stopped (or PATCH + 3 s)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from agentapi import follow, start
from labtools import Guest, Lab, LabHost
from moverates import MiB, Sampler, files_allocated, memory_stream_started, qemu_moved

from labkit.agents import agent_client
from labkit.bodies import migration_body, to_host_body

pytestmark = pytest.mark.lab

#: The window over which a capped rate is measured, from the PATCH.
SETTLE_S, WINDOW_END_S = 1.0, 3.0


async def _view(lab: Lab, host: LabHost, task_uuid: str) -> dict[str, Any]:
    async with agent_client(lab, host) as agent:
        return dict(await agent.task(task_uuid))


async def _wait_state(lab: Lab, host: LabHost, task_uuid: str, state: str) -> None:
    async with asyncio.timeout(120):
        while (view := await _view(lab, host, task_uuid))["state"] != state:
            assert view["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"), view.get("error")
            await asyncio.sleep(0.1)


class Retuner:
    """PATCHes one task and measures what each change did, printing the rates for the record."""

    def __init__(self, lab: Lab, host: LabHost, task_uuid: str, sampler: Sampler) -> None:
        self.lab, self.host, self.task_uuid, self.sampler = lab, host, task_uuid, sampler
        self.cap: int | None = None
        self.log: list[str] = []

    async def patch(self, mib: int) -> tuple[float, dict[str, Any]]:
        at = time.monotonic()
        async with agent_client(self.lab, self.host) as agent:
            view = dict(await agent.patch_task(self.task_uuid, bandwidth=mib))
        return at, view

    async def lower(self, mib: int, phase: str) -> dict[str, Any]:
        """PATCH a cap of ``mib`` MiB/s; the rate over the window must be within 10 % of it. ``phase``: the
        state the PATCH must land in ("memory phase": QEMU sends memory, whatever the agent says)."""
        at, view = await self.patch(mib)
        if phase != "memory phase":
            assert view["state"] == phase, f"PATCH {mib} landed in {view['state']}, not {phase}"
        await asyncio.sleep(max(0.0, at + WINDOW_END_S - time.monotonic()))
        before = self.sampler.rate(at - 1.5, at)
        rate = self.sampler.rate(at + SETTLE_S, at + WINDOW_END_S)
        self._say(phase, mib, before, rate)
        assert 0.9 * mib * MiB <= rate <= 1.1 * mib * MiB, self.log[-1]
        self.cap = mib
        return view

    async def lift(self, phase: str) -> dict[str, Any]:
        """PATCH bandwidth 0: at least 5 x the old cap from the PATCH until the transfer stopped."""
        at, view = await self.lift_now(phase)
        await asyncio.sleep(max(0.0, at + WINDOW_END_S - time.monotonic()))
        self.judge_lift(phase, at, at + WINDOW_END_S)
        return view

    async def lift_now(self, phase: str) -> tuple[float, dict[str, Any]]:
        """PATCH bandwidth 0 (judged later with ``judge_lift``)."""
        at, view = await self.patch(0)
        assert view["state"] == phase, f"PATCH 0 landed in {view['state']}, not {phase}"
        return at, view

    def judge_lift(self, phase: str, at: float, until: float) -> None:
        old = self.cap
        assert old is not None
        before = self.sampler.rate(at - 1.5, at)
        rate = self.sampler.rate_until_done(at, until)
        self._say(phase, 0, before, rate)
        assert rate >= 5 * old * MiB, self.log[-1]
        self.cap = None

    def _say(self, phase: str, mib: int, before: float, after: float) -> None:
        old = "uncapped" if self.cap is None else f"{self.cap}"
        line = (
            f"{phase}: {old} -> {mib or 'uncapped'} MiB/s: {before / MiB:.2f} MiB/s before, "
            f"{after / MiB:.2f} MiB/s after"
        )
        self.log.append(line)
        print(line)


def assert_lifted_in_qemu(view: dict[str, Any], *, stream: bool) -> None:
    """The PATCH's answer shows the lifted limits as read back from QEMU."""
    limits = view["details"]["limits"]
    assert limits["budgetBytesPerSecond"] is None and limits["unapplied"] == []
    effective = limits["effective"]
    assert effective["disks"] and all(d["bytesPerSecond"] == 0 for d in effective["disks"].values()), limits
    if stream:
        assert effective["migrationBytesPerSecond"] is None, limits


async def _finish(lab: Lab, host: LabHost, task_uuid: str, guest: Guest, within_s: float) -> dict[str, Any]:
    run = await follow(lab, host, task_uuid, within_s=within_s)
    assert run.state == "SUCCEEDED", run.task.get("error")
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output
    return run.task


async def test_lifting_the_cap_lets_a_stuck_move_finish(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """The issue's case: across hosts, 128 MiB guest, one data volume, 2 MiB/s, auto, the cap lifted 0.3 s
    after COPYING began: SUCCEEDED within 30 s of the PATCH, the details showing the lifted limits."""
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(data_volumes=1, memory_mib=128)
    guest.wait_for_acks(10)
    body = to_host_body(dst, withDataVolumes=True, bandwidth=2, strategy="auto")
    task = await start(lab_agents, src, guest.uuid, body)
    await _wait_state(lab_agents, src, task["taskUuid"], "COPYING")
    await asyncio.sleep(0.3)
    with Sampler(qemu_moved(src, guest.name)) as sampler:
        retuner = Retuner(lab_agents, src, task["taskUuid"], sampler)
        at, answer = await retuner.patch(0)
        assert answer["state"] == "COPYING"
        print(f"the PATCH answered {answer['details']['limits']}")
        assert answer["details"]["limits"]["budgetBytesPerSecond"] is None
        run = await follow(lab_agents, src, task["taskUuid"], within_s=30)
        ended = time.monotonic() - at
        assert run.state == "SUCCEEDED", run.task.get("error")
    print(f"SUCCEEDED {ended:.1f} s after the PATCH; limits {run.task['details']['limits']}")
    assert ended < 30
    assert_lifted_in_qemu(run.task, stream=True)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output


async def test_caps_lowered_and_lifted_across_hosts(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """One guest there and back. There: 20 -> 4 -> 2 in COPYING, back to 20, then 20 -> 4 -> 2 -> uncapped
    in CONVERGING. Back: uncapped -> 2 -> uncapped in COPYING, then uncapped -> 2 -> uncapped as the memory
    phase begins (the guest dirties faster than 4 MiB/s, so a capped memory phase does not converge)."""
    a, b = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(data_volumes=1, memory_mib=128, fill_mib=96, dirty_mib_s=8, working_set_mib=32)
    guest.wait_for_acks(10)

    body = to_host_body(b, withDataVolumes=True, bandwidth=20, downTime=50, strategy="precopy")
    task = await start(lab_agents, a, guest.uuid, body)
    with Sampler(qemu_moved(a, guest.name)) as sampler:
        retune = Retuner(lab_agents, a, task["taskUuid"], sampler)
        retune.cap = 20
        sampler.wait_until("the disk mirrors moving", lambda moved: moved > 8 * MiB, 120)
        await retune.lower(4, "COPYING")
        await retune.lower(2, "COPYING")
        await retune.patch(20)
        await _wait_state(lab_agents, a, task["taskUuid"], "CONVERGING")
        retune.cap = 20
        await retune.lower(4, "CONVERGING")
        await retune.lower(2, "CONVERGING")
        assert_lifted_in_qemu(await retune.lift("CONVERGING"), stream=True)
        await _finish(lab_agents, a, task["taskUuid"], guest, within_s=60)

    body = to_host_body(a, withDataVolumes=True, downTime=50, strategy="precopy")
    task = await start(lab_agents, b, guest.uuid, body)
    with Sampler(qemu_moved(b, guest.name)) as sampler:
        retune = Retuner(lab_agents, b, task["taskUuid"], sampler)
        sampler.wait_until("the disk mirrors moving", lambda moved: moved > 0, 120)
        await retune.lower(2, "COPYING")
        at, _ = await retune.lift_now("COPYING")
        memory = await asyncio.to_thread(memory_stream_started, b, guest.name, 60)
        retune.judge_lift("COPYING", at, memory)
        await retune.lower(2, "memory phase")
        assert_lifted_in_qemu(await retune.lift("CONVERGING"), stream=True)
        await _finish(lab_agents, b, task["taskUuid"], guest, within_s=60)


async def test_caps_lowered_and_lifted_on_one_host(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    """One move, rates from the destination files' growth: uncapped -> 2, then 20 -> 4 -> 2 -> uncapped."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest(data_volumes=1, fill_mib=400)
    guest.wait_for_acks(10)
    before = os.listdir(dst.path)
    task = await start(lab_agents, host, guest.uuid, migration_body(dst.uuid, withDataVolumes=True))
    with Sampler(files_allocated(dst.path, before), every=0.05) as sampler:
        retune = Retuner(lab_agents, host, task["taskUuid"], sampler)
        sampler.wait_until("the copies growing", lambda moved: moved > 16 * MiB, 120)
        view = await retune.lower(2, "COPYING")
        await retune.patch(20)
        retune.cap = 20
        await asyncio.sleep(2)
        await retune.lower(4, "COPYING")
        await retune.lower(2, "COPYING")
        assert_lifted_in_qemu(await retune.lift("COPYING"), stream=False)
        await _finish(lab_agents, host, task["taskUuid"], guest, within_s=60)
    assert view["details"]["limits"]["effective"]["disks"]
