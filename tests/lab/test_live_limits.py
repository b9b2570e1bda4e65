"""Live limits (issue 27): a PATCH of a running move's bandwidth takes effect in QEMU, lifting a cap or
lowering one, in the disk phase (COPYING) and the memory phase (CONVERGING), on one host and across hosts,
measured from outside the agent (the source QEMU's own counters, the destination files' growth); the move
then ends SUCCEEDED with every acknowledged write. Each move takes several PATCHes to stay cheap. The steps:
across hosts 20 -> 4 -> 20 in COPYING, 20 -> 4 -> 2 -> uncapped in CONVERGING, 2 -> uncapped 0.3 s into
COPYING; on one host 20 -> 4 -> uncapped and uncapped -> 2 -> uncapped in COPYING.

How a rate is judged:
- the memory stream (QEMU paces it in 100 ms slices): over [PATCH + 1 s, PATCH + 3 s], within 10 % of the cap;
- a disk mirror: QEMU 7.2's mirror copies up to its 16 MiB buffer at once and then sleeps as long as its
  speed requires, so its rate shows only from one burst to the next. Lowering does not wake a sleeping job:
  the first burst after the PATCH comes when the sleep under the old speed ends (within 3 s for the caps
  here), and from it the mirrors hold the new cap (the sum of their burst-to-burst rates within 10 %);
- uncapped: at least 5 x the old cap from the PATCH until the transfer stopped (or PATCH + 3 s)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from agentapi import follow, start
from labtools import Guest, Lab, LabHost
from moverates import MiB, Sampler, files_allocated, qemu_jobs, qemu_moved

from labkit.agents import agent_client
from labkit.bodies import migration_body, to_host_body

pytestmark = [pytest.mark.lab, pytest.mark.rates]

#: The window over which the memory stream's capped rate is measured, from the PATCH.
SETTLE_S, WINDOW_END_S = 1.0, 3.0
#: The cross-host guest's disks: records in the first half, then the filler, every byte data
#: (labkit/guestcreate.py). A mirror's progress counts what it copies of the allocated parts in disk order
#: (the holes are skipped): the records first (17 MiB in one run), then the filler.
DISK_MIB, FILL_MIB = 1024, 192
#: The step starts once every mirror's progress is in its filler, with enough of it ahead for the first
#: burst and four to measure (16 MiB each).
IN_FILLER_FROM, IN_FILLER_UNTIL = 48 * MiB, 120 * MiB


def inside_the_filler(sampler: Sampler, mirrors: list[str], timeout: float = 120) -> None:
    """Wait until every mirror's progress is inside its filler (a mirror that ran too far into it fails
    the premise, not the agent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        moved = sampler.samples[-1][1] if sampler.samples else {}
        if all(moved.get(m, 0) >= IN_FILLER_FROM for m in mirrors):
            ahead = {m: moved[m] for m in mirrors if moved[m] > IN_FILLER_UNTIL}
            assert not ahead, f"premise: mirrors too far into their filler to measure: {ahead}"
            return
        time.sleep(0.05)
    raise AssertionError(f"the mirrors never reached their filler: {sampler.samples[-1:]}")


def _wait_in_the_last(host: LabHost, vm: str, left: int, timeout: float = 60) -> None:
    """Wait until the one mirror job of ``vm`` has at most ``left`` bytes to go (QEMU's offset, len)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = qemu_jobs(host, vm)
        if jobs and jobs[0]["len"] - jobs[0]["offset"] <= left:
            return
        time.sleep(0.02)
    raise AssertionError(f"the mirror of {vm} never came within {left} bytes of its end")


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

    def __init__(self, lab: Lab, host: LabHost, task_uuid: str, sampler: Sampler, cap: int | None) -> None:
        self.lab, self.host, self.task_uuid, self.sampler = lab, host, task_uuid, sampler
        self.cap = cap
        self.patched_at = 0.0

    async def patch(self, mib: int, phase: str) -> tuple[float, dict[str, Any]]:
        at = self.patched_at = time.monotonic()
        async with agent_client(self.lab, self.host) as agent:
            view = dict(await agent.patch_task(self.task_uuid, bandwidth=mib))
        assert view["state"] == phase, f"PATCH {mib} landed in {view['state']}, not {phase}"
        return at, view

    async def lower_stream(self, mib: int, phase: str, stream: str | None = None) -> dict[str, Any]:
        """A cap of ``mib`` MiB/s on a smooth stream: its rate over the window within 10 % of it."""
        at, view = await self.patch(mib, phase)
        await asyncio.sleep(max(0.0, at + WINDOW_END_S - time.monotonic()))
        before = self.sampler.rate(at - 1.5, at, stream)
        rate = self.sampler.rate(at + SETTLE_S, at + WINDOW_END_S, stream)
        line = self._say(phase, mib, before, rate)
        assert 0.9 * mib * MiB <= rate <= 1.1 * mib * MiB, line
        self.cap = mib
        return view

    async def lower_mirrors(
        self,
        mib: int,
        phase: str,
        mirrors: list[str],
        bursts: int = 4,
        *,
        by: Sampler | None = None,
        landed: Sampler | None = None,
    ) -> list[str]:
        """A cap of ``mib`` MiB/s on bursting mirrors, read by ``by`` (default: the Retuner's sampler), in
        which ``mirrors`` are streams: the first burst of each within 3 s; from it each mirror's
        burst-to-burst rate within 10 % of the speed QEMU reports for it (where read) and the sum of those
        rates within 10 % of the cap. From no cap, the first step seen is the uncapped copy's last data and
        the rate counts from the next. ``landed``: a second measure from outside (the destination files'
        growth): the cap must hold by both, and be reached by at least one (each under-reads on its own in
        some runs: QEMU's progress read 1.50 MiB/s for a mirror whose file grew at its 2.00 on 2026-12-07,
        and the files' growth misses what the target leaves unallocated). Returns what did not hold (the
        caller asserts it at the end, so one move measures every step)."""
        sampler = by or self.sampler
        skip = 1 if self.cap is None else 0
        at, _view = await self.patch(mib, phase)
        per_disk = 16 * MiB / (mib * MiB / len(mirrors))  # seconds between two bursts of one mirror
        await asyncio.to_thread(
            sampler.wait_for_bursts, mirrors, at, bursts + skip, 3 + (bursts + skip - 0.5) * per_disk
        )
        before = sampler.rate(at - 3, at)
        measured = [sampler.burst_rate(m, at, skip=skip) for m in mirrors]
        total = sum(rate for _t0, _t1, rate in measured)
        line = self._say(phase, mib, before, total)
        over: list[str] = []  # the cap not held: wrong by any measure
        under: list[str] = []  # the cap not reached by QEMU's progress
        for mirror, (t0, t1, rate) in zip(mirrors, measured, strict=True):
            first = sampler.bursts(mirror, at)[0][0]
            speed = sampler.mean_speed(mirror, t0, t1)
            shown = "not read" if speed is None else f"{speed / MiB:.2f} MiB/s"
            print(
                f"  {mirror}: first burst {first - at:.2f} s after the PATCH, {rate / MiB:.2f} MiB/s over "
                f"{t1 - t0:.1f} s, QEMU's speed {shown}"
            )
            if first - at > 3.0:
                over.append(f"{mirror}: first burst {first - at:.2f} s after the PATCH")
            if speed is not None and rate > 1.1 * speed:
                over.append(f"{mirror}: {rate / MiB:.2f} MiB/s over its speed {speed / MiB:.2f}")
            if speed is not None and rate < 0.9 * speed:
                under.append(f"{mirror}: {rate / MiB:.2f} MiB/s under its speed {speed / MiB:.2f}")
        if total > 1.1 * mib * MiB:
            over.append(line)
        if total < 0.9 * mib * MiB:
            under.append(line)
        if landed is not None:
            files = sorted(landed.streams())
            await asyncio.to_thread(
                landed.wait_for_bursts, files, at, bursts + skip, 3 + (bursts + skip - 0.5) * per_disk
            )
            grew = [landed.burst_rate(f, at, skip=skip)[2] for f in files]
            grown = sum(grew)
            print(
                f"  the destination files grew {grown / MiB:.2f} MiB/s burst to burst ("
                + ", ".join(f"{r / MiB:.2f}" for r in grew)
                + ")"
            )
            if grown > 1.1 * mib * MiB:
                over.append(
                    f"{phase}: the destination files grew {grown / MiB:.2f} MiB/s under a cap of {mib}"
                )
            elif grown >= 0.9 * mib * MiB:
                under = []  # reached, by the files' growth
        self.cap = mib
        return over + under

    async def lift(self, phase: str) -> dict[str, Any]:
        """PATCH bandwidth 0: at least 5 x the old cap from the PATCH until the transfer stopped."""
        old = self.cap
        assert old is not None
        at, view = await self.patch(0, phase)
        await asyncio.sleep(max(0.0, at + WINDOW_END_S - time.monotonic()))
        before = self.sampler.rate(at - 1.5, at)
        rate = self.sampler.rate_until_done(at, at + WINDOW_END_S)
        line = self._say(phase, 0, before, rate)
        assert rate >= 5 * old * MiB, line
        self.cap = None
        return view

    def _say(self, phase: str, mib: int, before: float, after: float) -> str:
        old = "uncapped" if self.cap is None else f"{self.cap}"
        line = (
            f"{phase}: {old} -> {mib or 'uncapped'} MiB/s: {before / MiB:.2f} MiB/s before, "
            f"{after / MiB:.2f} MiB/s after"
        )
        print(line)
        return line


def assert_lifted_in_qemu(view: dict[str, Any], *, stream: bool) -> None:
    """The view shows the lifted limits as read back from QEMU."""
    limits = view["details"]["limits"]
    assert limits["budgetBytesPerSecond"] is None and limits["unapplied"] == [], limits
    effective = limits["effective"]
    assert effective["disks"] and all(d["bytesPerSecond"] == 0 for d in effective["disks"].values()), limits
    if stream:
        assert effective["migrationBytesPerSecond"] is None, limits


async def _finish(lab: Lab, host: LabHost, task_uuid: str, guest: Guest) -> dict[str, Any]:
    run = await follow(lab, host, task_uuid, within_s=60)
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
    at = time.monotonic()
    async with agent_client(lab_agents, src) as agent:
        answer = dict(await agent.patch_task(task["taskUuid"], bandwidth=0))
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
    """One move at 20 MiB/s: 20 -> 4 in COPYING (the mirrors), back to 20 for the rest of the disks, then
    20 -> 4 -> 2 -> uncapped in CONVERGING (the memory stream; the guest dirties its memory faster than
    4 MiB/s, so a capped memory phase does not converge)."""
    a, b = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(
        data_volumes=1,
        memory_mib=128,
        disk_size_mib=DISK_MIB,
        fill_mib=FILL_MIB,
        dirty_mib_s=8,
        working_set_mib=32,
    )
    guest.wait_for_acks(10)
    landing = b.root("ps1").path
    before = os.listdir(landing)
    # 300 ms, not 50: a switchover at 50 ms harms TCG guests on QEMU 7.2 whoever asks it (4 of 8 plain virsh
    # moves, docs/reliability.md); capped at 4 or 2 MiB/s the 32 MiB working set still cannot fit in 300 ms.
    body = to_host_body(b, withDataVolumes=True, bandwidth=20, downTime=300, strategy="precopy")
    task = await start(lab_agents, a, guest.uuid, body)
    with (
        Sampler(qemu_moved(a, guest.name)) as sampler,
        Sampler(files_allocated(landing, before), every=0.05) as landed,
    ):
        retune = Retuner(lab_agents, a, task["taskUuid"], sampler, cap=20)
        sampler.wait_until("the disk mirrors moving", lambda moved: moved > 8 * MiB, 120)
        mirrors = sorted(sampler.streams() - {"ram"})
        assert len(mirrors) == 2, mirrors
        # The mirrors' step is judged inside the filler, where every byte is data: read across the records'
        # part, which holds zeroes QEMU copies without charge, one mirror's progress ran at 2.74-2.87 MiB/s
        # against the 2.00-2.15 QEMU reported for it.
        await asyncio.to_thread(inside_the_filler, sampler, mirrors)
        wrong = await retune.lower_mirrors(4, "COPYING", mirrors, landed=landed)
        await retune.patch(20, "COPYING")
        await _wait_state(lab_agents, a, task["taskUuid"], "CONVERGING")
        retune.cap = 20
        await retune.lower_stream(4, "CONVERGING", "ram")
        await retune.lower_stream(2, "CONVERGING", "ram")
        assert_lifted_in_qemu(await retune.lift("CONVERGING"), stream=True)
        await _finish(lab_agents, a, task["taskUuid"], guest)
    assert not wrong, wrong


async def test_caps_lowered_and_lifted_on_one_host(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    """One move of one disk at 20 MiB/s, rates from the destination file's growth: 20 -> 4, then
    uncapped."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest(fill_mib=160)
    guest.wait_for_acks(10)
    before = os.listdir(dst.path)
    task = await start(lab_agents, host, guest.uuid, migration_body(dst.uuid, bandwidth=20))
    with Sampler(files_allocated(dst.path, before), every=0.05) as sampler:
        retune = Retuner(lab_agents, host, task["taskUuid"], sampler, cap=20)
        sampler.wait_until("the copy growing", lambda moved: moved > 24 * MiB, 120)
        (copy,) = sampler.streams()
        wrong = await retune.lower_mirrors(4, "COPYING", [copy], bursts=3)
        assert not wrong, wrong
        assert_lifted_in_qemu(await retune.lift("COPYING"), stream=False)
        await _finish(lab_agents, host, task["taskUuid"], guest)


async def test_a_cap_put_on_an_uncapped_copy_holds(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    """One uncapped move of one disk with 1 GiB of data, capped at 2 MiB/s in COPYING (0 -> 2): from the
    first burst after the uncapped copy's last data the destination file grows at the new cap; then lifted."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    fill = 1024
    guest = make_guest(disk_size_mib=2 * fill, fill_mib=fill)
    guest.wait_for_acks(10)
    before = os.listdir(dst.path)
    task = await start(lab_agents, host, guest.uuid, migration_body(dst.uuid))
    with (
        Sampler(files_allocated(dst.path, before), every=0.05) as sampler,
        Sampler(qemu_moved(host, guest.name)) as progress,
    ):
        retune = Retuner(lab_agents, host, task["taskUuid"], sampler, cap=None)
        sampler.wait_until("the copy growing", lambda moved: moved > 1 * MiB, 120)
        (copy,) = sampler.streams()
        # The cap goes on inside the filler (the disk's second half, every byte data): before it, the copy
        # crosses the records' part, whose zeroes QEMU copies without the file growing (0.19 MiB/s read there
        # under a cap of 2 on 2026-12-07, the cap held but unseen).
        await asyncio.to_thread(_wait_in_the_last, host, guest.name, (fill - 32) * MiB)
        await asyncio.to_thread(progress.wait_until, "the mirror job read", lambda moved: moved > 0, 10)
        (mirror,) = progress.streams() - {"ram"}
        # Read by QEMU's progress and by the file's growth: the cap must hold by both (the file's growth alone
        # under-read it in CI on 2026-12-07, 1.68 MiB/s under a cap of 2).
        wrong = await retune.lower_mirrors(2, "COPYING", [mirror], bursts=2, by=progress, landed=sampler)
        moved = sampler.samples[-1][1][copy]
        print(f"  {moved / MiB:.0f} MiB on the destination when the cap was measured")
        assert moved < (fill - 64) * MiB, "premise: the uncapped copy ran through the filler before the cap"
        assert not wrong, wrong
        assert_lifted_in_qemu(await retune.lift("COPYING"), stream=False)
        await _finish(lab_agents, host, task["taskUuid"], guest)
