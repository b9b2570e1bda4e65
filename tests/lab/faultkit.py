"""What every fault case shares: the lab restored around it, what it checks (``assert_settled``,
``assert_no_loss``), and how it drives a task (waits, kills, restarts). Used by test_faults.py and the
phase-by-fault matrix (test_fault_matrix.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agentapi import Run, disk_sources, qemu_img_chain, start
from labtools import Guest, Lab, LabHost, lab_cli, lab_status

from agent.client import ApiError
from labkit.agents import agent_client, agent_healthy, task_view
from labkit.bodies import migration_body, to_host_body
from labkit.virsh import virsh_output

FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


# -- the lab around each case --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def lab_restored(lab_agents: Lab) -> Iterator[Lab]:
    """Whatever a case killed comes back afterwards: libvirtd (`scripts/lab up` restarts a dead one; it
    leaves running agents of this checkout alone) and both agents (teammates share the lab)."""
    yield lab_agents
    status = lab_status()
    if not all(h["health"]["libvirtd"] for h in status.get("hosts", [])):
        lab_cli("up")
    for host in lab_agents.hosts:
        if not agent_healthy(host.agent_url):
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
        out = virsh_output(host.libvirt_uri, "blockjob", guest.name, target, "--info")
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
    return "Block Copy" in virsh_output(host.libvirt_uri, "blockjob", guest.name, target, "--info")


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
    assert not agent_healthy(host.agent_url)


def start_agent(lab: Lab, host: LabHost) -> None:
    try:
        lab.agent("start", host.name)
    except AssertionError:
        # Teammates share the lab: their fixtures start a dead agent too, and a second one cannot bind.
        if not agent_healthy(host.agent_url):
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
    async with agent_client(lab, host) as agent:
        mine = await agent.tasks(vm_uuid=guest.uuid)
    assert [t["taskUuid"] for t in mine] == [body["taskUuid"]]
    again = await start(lab, host, guest.uuid, body)
    assert again["taskUuid"] == body["taskUuid"] and again["state"] == "SUCCEEDED"


async def check_destination_full(lab: Lab, src: LabHost, dst: LabHost, guest: Guest, before: Before) -> None:
    """hostB's `small` root (64 MiB tmpfs) cannot take the disks: its agent refuses in the preflight before
    creating anything; the VM stays on hostA from its volumes."""
    small_before = set(os.listdir(dst.root("small").path))
    task = await start(lab, src, guest.uuid, to_host_body(dst, "small"))
    run = await finish(lab, src, task["taskUuid"], within_s=120)
    assert run.state == "FAILED"
    assert run.task["error"]["code"] == "AGENT.NO_SPACE", run.task["error"]
    assert "COPYING" not in run.states
    assert set(os.listdir(dst.root("small").path)) == small_before
    assert_settled(lab, guest, before, on=src, root=None)
