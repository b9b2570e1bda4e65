"""The fault matrix (issue 8): agents SIGKILLed and restarted, libvirtd restarted, a full destination, the
VM shut down by its user, cancels racing the switch, duplicate and concurrent requests; each with the writing
guest and `guest verify`.

Every case asserts the whole outcome, not only that nothing crashed (``assert_settled``): the VM runs on
exactly one host from one consistent set of volumes (live and persistent definitions agree, every layer of
every `qemu-img` chain is where it should be), zero acknowledged writes are lost, no file of the guest is left
in a storage root that should not have one, no block job or migration job is left, and the task ends in a
clear final state with an error code. docs/reliability.md has the table.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agentapi import start
from faultkit import (
    FINAL,
    SLOW_DISK_MIB,
    Before,
    assert_no_loss,
    assert_settled,
    block_copy_running,
    check_destination_full,
    check_duplicates,
    check_one_task,
    finish,
    kill_agent,
    lab_restored,
    mirrors_ready,
    small_guest,
    start_agent,
    wait_for_migration,
    wait_for_progress,
)
from labtools import Guest, Lab, LabHost, lab_status, restart_libvirtd

from labkit.agents import agent_client, agent_healthy, task_view
from labkit.bodies import migration_body, to_host_body
from labkit.waits import wait_until

pytestmark = pytest.mark.lab
__all__ = ["lab_restored"]  # the autouse fixture, imported so that it applies here


# -- same host: the source agent killed ----------------------------------------------------------------------


async def test_samehost_duplicate_requests_then_agent_killed_in_copy(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """The request sent five times at once, with a competing one (``check_duplicates``); then SIGKILL while
    the mirrors run: libvirt keeps the block jobs (they belong to the domain); the restarted agent finds them
    in its journal, keeps steering them, pivots and rewrites the persistent definition."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = small_guest(make_guest, data_volumes=1, fill_mib=48, disk_size_mib=SLOW_DISK_MIB)
    before = Before.take(lab_agents, host, guest)
    body = migration_body(dst.uuid, withDataVolumes=True, bandwidth=6)
    await check_duplicates(lab_agents, host, guest, body)
    task = {"taskUuid": body["taskUuid"]}
    await wait_until(lambda: block_copy_running(host, guest), "the mirror of vda")
    await wait_for_progress(lab_agents, host, task["taskUuid"], 10)
    kill_agent(lab_agents, host)
    assert block_copy_running(host, guest), "the mirror must outlive the agent"
    start_agent(lab_agents, host)

    run = await finish(lab_agents, host, task["taskUuid"])

    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.states[-3:] == ["SWITCHING", "VERIFYING", "SUCCEEDED"], run.states
    await check_one_task(lab_agents, host, guest, body)
    assert_settled(lab_agents, guest, before, on=host, root=dst.path)
    assert_no_loss(guest)


async def test_samehost_agent_killed_between_pivots_pivots_the_rest(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """The switch phase: the agent dies after pivoting vda and before vdb (its journal says `switching`).
    The pivots take milliseconds, too short to hit with a kill, so the test builds that exact state: SIGKILL
    while mirroring, wait for READY, pivot vda by hand, and move the journal's step to `switching` as the
    agent writes it before its first pivot. The restarted agent must pivot vdb forward, rewrite the
    persistent definition and succeed."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = small_guest(make_guest, data_volumes=1, fill_mib=16)
    before = Before.take(lab_agents, host, guest)
    task = await start(
        lab_agents, host, guest.uuid, migration_body(dst.uuid, withDataVolumes=True, bandwidth=32)
    )
    await wait_until(lambda: block_copy_running(host, guest, "vdb"), "the mirror of vdb", every=0.02)
    kill_agent(lab_agents, host)
    for target in ("vda", "vdb"):  # nobody paces the mirrors now: let them run uncapped to READY
        host.virsh("blockjob", guest.name, target, "--bandwidth", "0", check=False)
    await wait_until(lambda: mirrors_ready(host, guest, ["vda", "vdb"]), "both mirrors READY", within=120)
    host.virsh("blockjob", guest.name, "vda", "--pivot")
    set_journal_step(host, task["taskUuid"], "switching")
    assert not agent_healthy(host.agent_url), "someone restarted the agent before the journal was set up"
    start_agent(lab_agents, host)

    run = await finish(lab_agents, host, task["taskUuid"])

    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.states[-2:] == ["VERIFYING", "SUCCEEDED"], run.states
    assert_settled(lab_agents, guest, before, on=host, root=dst.path)
    assert_no_loss(guest)


def set_journal_step(host: LabHost, task_uuid: str, step: str) -> None:
    """Rewrite the step of a task's checkpoint in a stopped agent's journal (SQLite, state_dir)."""
    journal = host.agent_config.parent / "state" / "journal.sqlite"
    db = sqlite3.connect(journal)
    try:
        (text,) = db.execute("SELECT checkpoint FROM tasks WHERE uuid = ?", (task_uuid,)).fetchone()
        checkpoint = json.loads(text)
        assert checkpoint["step"] == "mirroring", checkpoint["step"]
        checkpoint["step"] = step
        db.execute("UPDATE tasks SET checkpoint = ? WHERE uuid = ?", (json.dumps(checkpoint), task_uuid))
        db.commit()
    finally:
        db.close()


# -- cancel racing the switch --------------------------------------------------------------------------------


def libvirtd_pid(host: LabHost) -> int:
    return int(next(h for h in lab_status()["hosts"] if h["name"] == host.name)["pids"]["libvirtd"])


async def test_samehost_cancel_racing_the_switch(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    """The cancel arrives while the pivots are under way. To land it there every time, libvirtd is frozen
    (SIGSTOP) the moment the agent logs SWITCHING, so the pivot call hangs; the cancel is sent; libvirtd
    thaws. A pivot cannot be undone: the agent finishes the switch and the persistent definition's rewrite
    and reports SUCCEEDED with a cancelTooLate note, never a CANCELLED task whose VM moved."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = small_guest(make_guest, data_volumes=1, fill_mib=16)
    before = Before.take(lab_agents, host, guest)
    log = Path(lab_status_host(host)["agentLog"])
    offset = log.stat().st_size
    task = await start(
        lab_agents, host, guest.uuid, migration_body(dst.uuid, withDataVolumes=True, bandwidth=16)
    )
    marker = f"task={task['taskUuid']} "
    pid = libvirtd_pid(host)

    def switching() -> bool:
        with log.open("rb") as f:
            f.seek(offset)
            return any(marker in line and "-> SWITCHING" in line for line in f.read().decode().splitlines())

    await wait_until(switching, "the task to reach SWITCHING", within=120, every=0.005)
    os.kill(pid, signal.SIGSTOP)
    try:
        async with agent_client(lab_agents, host) as agent:
            answer = dict(await agent.cancel(task["taskUuid"]))
        await asyncio.sleep(1)
    finally:
        os.kill(pid, signal.SIGCONT)

    run = await finish(lab_agents, host, task["taskUuid"])

    # The cancel landed in the race: accepted (the task was not over), while the task was SWITCHING, and the
    # switch then went on to its end.
    assert answer["state"] == "CANCELLING", answer
    assert run.states[-3:] == ["SWITCHING", "CANCELLING", "SUCCEEDED"], run.states
    assert "cancelTooLate" in run.task["details"], run.task["details"]
    assert_settled(lab_agents, guest, before, on=host, root=dst.path)
    assert_no_loss(guest)


def lab_status_host(host: LabHost) -> dict[str, Any]:
    return dict(next(h for h in lab_status()["hosts"] if h["name"] == host.name))


async def test_crosshost_cancel_after_postcopy_started(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """Cross host, the switch is the start of post-copy: from there the guest runs on hostB and nothing can
    roll back. A cancel then must not end CANCELLED with the VM gone: the migration finishes, the
    destination is committed and the task says SUCCEEDED with cancelTooLate."""
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = small_guest(make_guest, dirty_mib_s=8, memory_mib=256)
    before = Before.take(lab_agents, src, guest)
    task = await start(
        lab_agents, src, guest.uuid, to_host_body(dst, bandwidth=5, downTime=100, strategy="postcopy")
    )

    async def postcopy() -> bool:
        view = await task_view(lab_agents, src, task["taskUuid"])
        assert view["state"] not in FINAL, view
        return "postcopy" in view["details"]

    deadline = time.monotonic() + 180
    while not await postcopy():
        assert time.monotonic() < deadline, "post-copy never started"
        await asyncio.sleep(0.2)
    async with agent_client(lab_agents, src) as agent:
        answer = dict(await agent.cancel(task["taskUuid"]))

    run = await finish(lab_agents, src, task["taskUuid"])

    # The cancel landed in the race: accepted while post-copy ran (the task was not over), and the migration
    # still went on to its end.
    assert answer["state"] == "CANCELLING", answer
    assert run.states[-2:] == ["CANCELLING", "SUCCEEDED"], run.states
    assert run.states[run.states.index("CANCELLING") - 1] == "CONVERGING", run.states
    assert "cancelTooLate" in run.task["details"], run.task["details"]
    assert_settled(lab_agents, guest, before, on=dst, root=dst.root("ps1").path)
    assert_no_loss(guest)


# -- same host: libvirtd restarted under a copy --------------------------------------------------------------


async def test_samehost_libvirtd_restarted_in_copy(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    """libvirtd goes away under a running copy: QEMU keeps mirroring, the agent rides out the outage and
    reconnects, libvirt picks the block jobs up again, and the task pivots; or it fails cleanly."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = small_guest(make_guest, fill_mib=48, disk_size_mib=SLOW_DISK_MIB)
    before = Before.take(lab_agents, host, guest)
    task = await start(lab_agents, host, guest.uuid, migration_body(dst.uuid, bandwidth=6))
    await wait_until(lambda: block_copy_running(host, guest), "the mirror of vda")
    await wait_for_progress(lab_agents, host, task["taskUuid"], 5)
    await asyncio.to_thread(restart_libvirtd, host)
    assert block_copy_running(host, guest), "libvirt took the block job back after its restart"

    run = await finish(lab_agents, host, task["taskUuid"])

    assert run.state == "SUCCEEDED", run.task.get("error")
    assert_settled(lab_agents, guest, before, on=host, root=dst.path)
    assert_no_loss(guest)


# -- the VM shut down by its user ----------------------------------------------------------------------------


async def test_samehost_vm_destroyed_mid_copy(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    """`virsh destroy` while the mirrors run: QEMU ends the jobs with the VM; the task fails with a clear
    error, the destination files go, the definition keeps the source volumes, and the VM boots from them."""
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = small_guest(make_guest, fill_mib=48, disk_size_mib=SLOW_DISK_MIB)
    before = Before.take(lab_agents, host, guest)
    task = await start(lab_agents, host, guest.uuid, migration_body(dst.uuid, bandwidth=6))
    await wait_until(lambda: block_copy_running(host, guest), "the mirror of vda")
    await wait_for_progress(lab_agents, host, task["taskUuid"], 5)
    host.virsh("destroy", guest.name)

    run = await finish(lab_agents, host, task["taskUuid"], within_s=120)

    assert run.state == "FAILED", run.task
    assert run.task["error"]["code"] == "AGENT.VM_STOPPED", run.task["error"]
    assert_settled(lab_agents, guest, before, on=host, root=None, state="shut off")
    result = guest.verify()
    assert result.ok, result.output
    host.virsh("start", guest.name)
    assert_settled(lab_agents, guest, before, on=host, root=None)
    assert_no_loss(guest)


async def test_crosshost_destination_full_then_vm_destroyed_mid_migration(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """First a move onto hostB's full `small` root (``check_destination_full``). Then `virsh destroy` on the
    source while the migration copies: libvirt aborts the migration, the destination removes what it
    prepared, the task fails with a clear error; the VM boots on hostA."""
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = small_guest(make_guest, fill_mib=48)
    before = Before.take(lab_agents, src, guest)
    await check_destination_full(lab_agents, src, dst, guest, before)
    task = await start(lab_agents, src, guest.uuid, to_host_body(dst, bandwidth=6))
    await wait_for_migration(lab_agents, src, guest, task["taskUuid"])
    await wait_for_progress(lab_agents, src, task["taskUuid"], 5)
    src.virsh("destroy", guest.name)

    run = await finish(lab_agents, src, task["taskUuid"], within_s=120)

    assert run.state == "FAILED", run.task
    assert run.task["error"]["code"] == "AGENT.VM_STOPPED", run.task["error"]
    assert_settled(lab_agents, guest, before, on=src, root=None, state="shut off")
    assert guest.verify().ok
    src.virsh("start", guest.name)
    assert_settled(lab_agents, guest, before, on=src, root=None)
    assert_no_loss(guest)
