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
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentapi import Run, disk_sources, migration_body, qemu_img_chain, start
from labtools import Guest, Lab, LabHost, lab_cli, lab_status, restart_libvirtd

from agent.client import AgentClient, AgentUnreachable, ApiError

pytestmark = pytest.mark.lab
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


# -- the lab around each case --------------------------------------------------------------------------------


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/v1/health", timeout=3) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


@pytest.fixture(autouse=True)
def lab_restored(lab_agents: Lab) -> Iterator[Lab]:
    """Whatever a case killed comes back afterwards: libvirtd (`scripts/lab up` restarts a dead one; it
    leaves running agents of this checkout alone) and both agents (teammates share the lab)."""
    yield lab_agents
    status = lab_status()
    if not all(h["health"]["libvirtd"] for h in status.get("hosts", [])):
        lab_cli("up")
    for host in lab_agents.hosts:
        if not _healthy(host.agent_url):
            lab_agents.agent("start", host.name)


# -- what a case checks --------------------------------------------------------------------------------------


#: Same-host copies that must last long enough to be hit: on 256 MiB disks the real-bytes pacing did not
#: hold a 6 MiB/s cap in this lab (48 MiB of data went in about 3 s), on 1 GiB disks it does.
SLOW_DISK_MIB = 1024


def small_guest(make_guest: Callable[..., Guest], **options: Any) -> Guest:
    """A writing guest sized for short cases: 256 MiB disks (their filler sits in the second half) and 256 MiB
    of memory; ``fill_mib`` of data per disk is what a copy moves at the capped rate. Not 128 MiB: such TCG
    guests panicked on the destination right after an `auto` live migration 3 times in 10 (see
    docs/reliability.md)."""
    return make_guest(**{"disk_size_mib": 256, "memory_mib": 256, **options})


def to_host(dst: LabHost, storage: str = "ps1", **extra: Any) -> dict[str, Any]:
    return migration_body(
        dst.root(storage).uuid,
        dstHostUuid=dst.uuid,
        dstHost={"uuid": dst.uuid, "agentUrl": dst.agent_url, "migrationAddress": dst.migration_address},
        **extra,
    )


@dataclass
class Before:
    """The guest and the storage roots of both hosts before a case: what must (not) change."""

    sources: dict[str, str]  # target -> top on the source host
    names: set[str]  # file names of every image of the guest (all chain layers)
    files: dict[tuple[str, str], set[str]]  # (host, root) -> the guest's files there

    @classmethod
    def take(cls, lab: Lab, host: LabHost, guest: Guest) -> Before:
        sources = disk_sources(host, guest.name)
        names = {
            os.path.basename(layer["filename"]) for top in sources.values() for layer in qemu_img_chain(top)
        }
        return cls(sources, names, guest_files(lab, names))


def guest_files(lab: Lab, names: set[str]) -> dict[tuple[str, str], set[str]]:
    """The guest's image files in every storage root of both hosts (other files belong to teammates'
    runs sharing the lab, so a whole-directory comparison would be flaky)."""
    return {
        (host.name, root.name): {f for f in os.listdir(root.path) if f in names}
        for host in lab.hosts
        for root in host.storage
    }


def no_jobs(host: LabHost, guest: Guest, targets: list[str]) -> None:
    for target in targets:
        out = virsh_all(host, "blockjob", guest.name, target, "--info")
        assert "No current block job" in out, f"{guest.name} {target} on {host.name}: {out}"
    info = host.virsh("domjobinfo", guest.name)
    assert "Job type:" in info and "None" in info.split("Job type:")[1].splitlines()[0], info


def assert_settled(
    lab: Lab,
    guest: Guest,
    before: Before,
    *,
    on: LabHost,
    root: Path | None,
    layers: int = 1,
    state: str = "running",
) -> dict[str, str]:
    """The VM is defined on `on` only, in `state`, live and persistent definitions agree, every disk's top is
    in `root` (None: exactly where it was) with a chain of `layers` files all there, no job is left, and the
    guest's files exist nowhere else (destination files removed, or the source ones kept)."""
    assert guest.where() == {on.name: state}, guest.where()
    persistent = disk_sources(on, guest.name, inactive=True)
    live = persistent if state != "running" else disk_sources(on, guest.name)
    assert live == persistent, f"live {live} != persistent {persistent}"
    assert set(live) == set(before.sources)
    for target, top in live.items():
        if root is None:
            assert top == before.sources[target]
        else:
            assert os.path.dirname(top) == str(root), f"{target}: {top} not in {root}"
        chain = qemu_img_chain(top)
        assert len(chain) == (layers if root is not None else len(qemu_img_chain(before.sources[target])))
        for layer in chain:
            assert os.path.exists(layer["filename"])
            assert os.path.dirname(layer["filename"]) == os.path.dirname(top), chain
    if state == "running":
        no_jobs(on, guest, list(live))
    # Files of the guest: the source ones stay (the management plane deletes them); new ones only where
    # the VM now runs from.
    after = guest_files(lab, before.names)
    for (host_name, root_name), names in after.items():
        was = before.files[(host_name, root_name)]
        root_path = lab.host(host_name).root(root_name).path
        if host_name == on.name and root is not None and root_path == root:
            assert was <= names, f"{host_name}/{root_name}: lost {was - names}"
        else:
            assert names == was, f"{host_name}/{root_name}: {sorted(names - was)} left behind"
    return live


def assert_no_loss(guest: Guest, *, more: int = 10) -> None:
    """The guest still writes, and every write it acknowledged is on its current disks."""
    guest.wait_for_acks(more)
    result = guest.verify()
    assert result.ok, result.output
    assert result.records > 0


# -- driving a case ------------------------------------------------------------------------------------------


async def task_view(lab: Lab, host: LabHost, task_uuid: str) -> dict[str, Any]:
    """The task's view; an agent that is restarting (this case's kill, or another run sharing the lab) is
    asked again for up to a minute."""
    deadline = time.monotonic() + 60
    while True:
        try:
            async with AgentClient(host.agent_url, lab.token) as agent:
                return dict(await agent.task(task_uuid))
        except AgentUnreachable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def wait_until(check: Callable[[], bool], what: str, within: float = 60, every: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def virsh_all(host: LabHost, *args: str) -> str:
    """stdout and stderr of virsh (`blockjob --info` prints its progress line on stderr)."""
    proc = subprocess.run(
        ["virsh", "-c", host.libvirt_uri, *args], capture_output=True, text=True, timeout=60, check=False
    )
    return proc.stdout + proc.stderr


async def wait_for_progress(lab: Lab, host: LabHost, task_uuid: str, percent: float) -> None:
    """Until the task's progress reaches ``percent``; fails at once, with its error, if it ends first."""
    deadline = time.monotonic() + 120
    while True:
        view = await task_view(lab, host, task_uuid)
        assert view["state"] not in FINAL, f"the task ended early: {view['state']} {view['error']}"
        if view["progress"]["percent"] >= percent:
            return
        assert time.monotonic() < deadline, f"progress stuck at {view['progress']}"
        await asyncio.sleep(0.1)


def block_copy_running(host: LabHost, guest: Guest, target: str = "vda") -> bool:
    return "Block Copy" in virsh_all(host, "blockjob", guest.name, target, "--info")


async def wait_for_migration(lab: Lab, host: LabHost, guest: Guest, task_uuid: str) -> None:
    """Until libvirt runs the outgoing migration; fails at once, with its error, if the task ends first."""
    deadline = time.monotonic() + 120
    while not await asyncio.to_thread(migration_running, host, guest):
        view = await task_view(lab, host, task_uuid)
        assert view["state"] not in FINAL, f"the task ended early: {view['state']} {view['error']}"
        assert time.monotonic() < deadline, f"no migration job; task in {view['state']}"
        await asyncio.sleep(0.1)


def migration_running(host: LabHost, guest: Guest) -> bool:
    out = host.virsh("domjobinfo", guest.name, check=False)
    return "Unbounded" in out and "Outgoing migration" in out


def mirrors_ready(host: LabHost, guest: Guest, targets: list[str]) -> bool:
    xml = host.virsh("dumpxml", guest.name, check=False)
    return xml.count("ready='yes'") + xml.count('ready="yes"') >= len(targets)


def kill_agent(lab: Lab, host: LabHost) -> None:
    lab.agent("kill", host.name)
    assert not _healthy(host.agent_url)


def start_agent(lab: Lab, host: LabHost) -> None:
    try:
        lab.agent("start", host.name)
    except AssertionError:
        # Teammates share the lab: their fixtures start a dead agent too, and a second one cannot bind.
        if not _healthy(host.agent_url):
            raise


async def finish(lab: Lab, host: LabHost, task_uuid: str, within_s: float = 240) -> Run:
    """Follow the task to its end (``Run`` with every sample), riding out agent restarts."""
    samples: list[tuple[float, dict[str, Any]]] = []
    async with asyncio.timeout(within_s):
        while True:
            view = await task_view(lab, host, task_uuid)
            samples.append((time.monotonic(), view))
            if view["state"] in FINAL:
                break
            await asyncio.sleep(0.25)
    run = Run(view, samples)
    if run.state != "SUCCEEDED":
        assert run.task["error"] and run.task["error"]["code"], run.task
    return run


async def check_duplicates(lab: Lab, host: LabHost, guest: Guest, body: dict[str, Any]) -> None:
    """The same request five times at once is one task; another request for the VM is a 409 naming that task;
    the same taskUuid with another body is a 409 on taskUuid."""
    answers = await asyncio.gather(*(start(lab, host, guest.uuid, body) for _ in range(5)))
    assert {a["taskUuid"] for a in answers} == {body["taskUuid"]}
    with pytest.raises(ApiError) as conflict:
        await start(lab, host, guest.uuid, migration_body(host.root("ps1").uuid))
    assert conflict.value.status == 409 and conflict.value.error["field"] == "vmUuid"
    assert body["taskUuid"] in conflict.value.error["description"]
    with pytest.raises(ApiError) as reused:
        await start(lab, host, guest.uuid, {**body, "migrateVm": {"bandwidth": 9}})
    assert reused.value.status == 409 and reused.value.error["field"] == "taskUuid"


async def check_one_task(lab: Lab, host: LabHost, guest: Guest, body: dict[str, Any]) -> None:
    """Only one task ever ran for the VM, and the request sent again after its end is that finished task."""
    async with AgentClient(host.agent_url, lab.token) as agent:
        mine = await agent.tasks(vm_uuid=guest.uuid)
    assert [t["taskUuid"] for t in mine] == [body["taskUuid"]]
    again = await start(lab, host, guest.uuid, body)
    assert again["taskUuid"] == body["taskUuid"] and again["state"] == "SUCCEEDED"


async def check_destination_full(lab: Lab, src: LabHost, dst: LabHost, guest: Guest, before: Before) -> None:
    """hostB's `small` root (64 MiB tmpfs) cannot take the disks: its agent refuses in the preflight before
    creating anything; the VM stays on hostA from its volumes."""
    small_before = set(os.listdir(dst.root("small").path))
    task = await start(lab, src, guest.uuid, to_host(dst, "small"))
    run = await finish(lab, src, task["taskUuid"], within_s=120)
    assert run.state == "FAILED"
    assert run.task["error"]["code"] == "AGENT.NO_SPACE", run.task["error"]
    assert "COPYING" not in run.states
    assert set(os.listdir(dst.root("small").path)) == small_before
    assert_settled(lab, guest, before, on=src, root=None)


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
    assert not _healthy(host.agent_url), "someone restarted the agent before the journal was set up"
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
        async with AgentClient(host.agent_url, lab_agents.token) as agent:
            answer = dict(await agent.cancel(task["taskUuid"]))
        await asyncio.sleep(1)
    finally:
        os.kill(pid, signal.SIGCONT)

    run = await finish(lab_agents, host, task["taskUuid"])

    assert run.state == "SUCCEEDED", run.task
    if answer["state"] == "CANCELLING":
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
        lab_agents, src, guest.uuid, to_host(dst, bandwidth=5, downTime=100, strategy="postcopy")
    )

    async def postcopy() -> bool:
        view = await task_view(lab_agents, src, task["taskUuid"])
        assert view["state"] not in FINAL, view
        return "postcopy" in view["details"]

    deadline = time.monotonic() + 180
    while not await postcopy():
        assert time.monotonic() < deadline, "post-copy never started"
        await asyncio.sleep(0.2)
    async with AgentClient(src.agent_url, lab_agents.token) as agent:
        answer = dict(await agent.cancel(task["taskUuid"]))

    run = await finish(lab_agents, src, task["taskUuid"])

    assert run.state == "SUCCEEDED", run.task
    if answer["state"] == "CANCELLING":
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


# -- cross host: an agent killed -----------------------------------------------------------------------------

#: These cases are about the agents, not the convergence strategy. With `auto` the TCG guest panicked on the
#: destination right after the switchover in 5 runs of 7 when an agent had been killed (with `precopy`: 0 of
#: 4); the cause is not found yet and is written down as open in docs/reliability.md.
KILL_CASE_STRATEGY: dict[str, Any] = {"strategy": "precopy", "downTime": 500}


async def test_crosshost_source_agent_killed_mid_migration(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """SIGKILL of the source agent while the peer-to-peer migration copies: libvirt goes on without it; the
    restarted agent watches the migration to its end and commits the destination: the task ends with the
    truth (SUCCEEDED, the VM on hostB)."""
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = small_guest(make_guest, data_volumes=1, fill_mib=48)
    before = Before.take(lab_agents, src, guest)
    task = await start(
        lab_agents,
        src,
        guest.uuid,
        to_host(dst, withDataVolumes=True, bandwidth=6, **KILL_CASE_STRATEGY),
    )
    await wait_for_migration(lab_agents, src, guest, task["taskUuid"])
    await wait_for_progress(lab_agents, src, task["taskUuid"], 5)
    kill_agent(lab_agents, src)
    assert migration_running(src, guest), "a peer-to-peer migration must outlive the agent"
    start_agent(lab_agents, src)

    run = await finish(lab_agents, src, task["taskUuid"])

    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.states[-1] == "SUCCEEDED" and "VERIFYING" in run.states
    assert_settled(lab_agents, guest, before, on=dst, root=dst.root("ps1").path)
    assert {v["installPath"] for v in run.volumes().values()} == set(disk_sources(dst, guest.name).values())
    assert_no_loss(guest)


async def test_crosshost_destination_agent_killed_until_the_end(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """SIGKILL of the destination agent during the migration, back only after libvirt finished it: the
    migration itself does not need that agent; the source keeps asking it to commit until it answers."""
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = small_guest(make_guest, fill_mib=16)
    before = Before.take(lab_agents, src, guest)
    task = await start(
        lab_agents, src, guest.uuid, to_host(dst, bandwidth=16, strategy="precopy", downTime=500)
    )
    await wait_for_migration(lab_agents, src, guest, task["taskUuid"])
    kill_agent(lab_agents, dst)
    try:
        await wait_until(lambda: guest.where() == {dst.name: "running"}, "the VM on hostB", within=120)
        await asyncio.sleep(2)
        view = await task_view(lab_agents, src, task["taskUuid"])
        assert view["state"] not in FINAL, f"ended while its destination agent was down: {view['error']}"
    finally:
        start_agent(lab_agents, dst)

    run = await finish(lab_agents, src, task["taskUuid"])

    assert run.state == "SUCCEEDED", run.task.get("error")
    assert_settled(lab_agents, guest, before, on=dst, root=dst.root("ps1").path)
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
    task = await start(lab_agents, src, guest.uuid, to_host(dst, bandwidth=6))
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


@pytest.mark.parametrize(
    ("side", "codes"),
    [
        # The source libvirtd drives the peer-to-peer migration: on reconnecting it cancels the interrupted
        # outgoing migration and the VM runs on here. The agent waits for libvirtd and for the job's end
        # before it looks, and must not take the paused incoming domain on hostB for an arrival.
        ("source", ("AGENT.MIGRATION_FAILED",)),
        # The destination's recovery kills the incoming domain; its agent refuses to clean up until it
        # reaches its libvirtd again (it could not tell whether the VM runs there), so the source asks again.
        ("destination", ("AGENT.MIGRATION_FAILED", "AGENT.MIGRATION_STALLED", "AGENT.DISK_COPY_FAILED")),
    ],
)
async def test_crosshost_libvirtd_restarted_mid_migration(
    lab_agents: Lab, make_guest: Callable[..., Guest], side: str, codes: tuple[str, ...]
) -> None:
    """libvirtd on one side restarts while the disks are copied: FAILED, the VM runs on hostA from its
    source volumes, hostB is clean, nothing is lost."""
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = small_guest(make_guest, fill_mib=48)
    before = Before.take(lab_agents, src, guest)
    task = await start(lab_agents, src, guest.uuid, to_host(dst, bandwidth=6))
    await wait_for_migration(lab_agents, src, guest, task["taskUuid"])
    await wait_for_progress(lab_agents, src, task["taskUuid"], 5)
    await asyncio.to_thread(restart_libvirtd, src if side == "source" else dst)

    run = await finish(lab_agents, src, task["taskUuid"])

    assert run.state == "FAILED", run.task
    assert run.task["error"]["code"] in codes, run.task["error"]
    assert_settled(lab_agents, guest, before, on=src, root=None)
    assert_no_loss(guest)
