"""VMs whose chain libvirt made (issue 16, part two): `virsh snapshot-create-as --disk-only` keeps snapshot
metadata; a move carries it, rewritten to the new paths, on the same host and across hosts. Internal
(qcow2) snapshots are refused before anything is copied."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
from agentapi import disk_sources, migrate, qemu_img_chain, start
from faultkit import finish, kill_agent, lab_restored, start_agent, wait_for_migration
from labtools import Guest, Lab, LabHost

from agent.migration.snapshots import snapshot_paths
from labkit.bodies import migration_body, to_host_body

pytestmark = pytest.mark.lab
__all__ = ["lab_restored"]  # the autouse fixture (agents and libvirtd back after each case)


def take_two_snapshots(host: LabHost, guest: Guest) -> None:
    """s1 then s2, disk-only and atomic, with libvirt's metadata; the guest writes into every layer."""
    for name in ("s1", "s2"):
        guest.wait_for_acks(10)
        host.virsh("snapshot-create-as", guest.name, name, "--disk-only", "--atomic")
    guest.wait_for_acks(10)


def assert_snapshots_at(host: LabHost, guest: Guest, root: str, old: dict[str, str]) -> None:
    """Both snapshots listed as a tree (s2 under s1, s2 current), every path they name in ``root``."""
    tree = host.virsh("snapshot-list", guest.name, "--tree")
    assert tree.index("s1") < tree.index("s2") and "+- s2" in tree, tree
    assert host.virsh("snapshot-current", guest.name, "--name").strip() == "s2"
    for name in ("s1", "s2"):
        paths = snapshot_paths(host.virsh("snapshot-dumpxml", guest.name, name))
        assert paths and all(os.path.dirname(p) == root for p in paths), (name, paths)
        assert not set(paths) & set(old.values())
    parent = host.virsh("snapshot-parent", guest.name, "s2").strip()
    assert parent == "s1"


async def test_samehost_move_carries_two_libvirt_snapshots(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest(data_volumes=1)
    take_two_snapshots(host, guest)
    before = disk_sources(host, guest.name)
    assert all(len(qemu_img_chain(p)) == 3 for p in before.values())

    run = await migrate(
        lab_agents, host, guest.uuid, migration_body(dst.uuid, withDataVolumes=True, withSnapshots=True)
    )
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.task["details"]["snapshots"] == {"carried": ["s1", "s2"], "current": "s2"}
    live = disk_sources(host, guest.name)
    assert all(os.path.dirname(p) == str(dst.path) for p in live.values())
    assert all(len(qemu_img_chain(p)) == 3 for p in live.values())
    assert_snapshots_at(host, guest, str(dst.path), before)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output


async def test_crosshost_move_carries_two_libvirt_snapshots(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(data_volumes=1)
    take_two_snapshots(src, guest)
    before = disk_sources(src, guest.name)

    run = await migrate(
        lab_agents,
        src,
        guest.uuid,
        to_host_body(dst, withDataVolumes=True, withSnapshots=True, downTime=1000, timeout=600),
    )
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert guest.where() == {"hostB": "running"}
    assert run.task["details"]["snapshots"] == {"carried": ["s1", "s2"], "current": "s2"}
    live = disk_sources(dst, guest.name)
    root = str(dst.root("ps1").path)
    assert all(os.path.dirname(p) == root and len(qemu_img_chain(p)) == 3 for p in live.values())
    assert_snapshots_at(dst, guest, root, before)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output


async def test_internal_snapshots_are_refused_before_anything_is_copied(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest()
    guest.wait_for_acks(10)
    host.virsh("snapshot-create-as", guest.name, "inside1")  # internal: qcow2 snapshot, with memory
    before, dst_files = disk_sources(host, guest.name), set(os.listdir(dst.path))

    run = await migrate(lab_agents, host, guest.uuid, migration_body(dst.uuid, withSnapshots=True))
    assert run.state == "FAILED"
    assert run.task["error"]["code"] == "AGENT.INTERNAL_SNAPSHOTS", run.task["error"]
    assert "inside1" in run.task["error"]["description"] and "vda" in run.task["error"]["description"]
    assert "COPYING" not in [s["state"] for s in run.task["states"]]
    assert disk_sources(host, guest.name) == before and set(os.listdir(dst.path)) == dst_files
    host.virsh("snapshot-delete", guest.name, "inside1")
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output


async def test_crosshost_snapshots_survive_a_source_agent_restart_mid_migration(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """The metadata is off the source while libvirt migrates (libvirt 9.0 refuses a domain that has any):
    the source agent is killed right then and started again 2 s later; the task resumes from its journal,
    and the metadata ends up where the VM runs, rewritten to the new paths."""
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(data_volumes=1)
    take_two_snapshots(src, guest)
    before = disk_sources(src, guest.name)
    body = to_host_body(
        dst, withDataVolumes=True, withSnapshots=True, downTime=1000, bandwidth=20, timeout=600
    )
    task = await start(lab_agents, src, guest.uuid, body)
    try:
        await wait_for_migration(lab_agents, src, guest, task["taskUuid"])
        assert "s1" not in src.virsh("snapshot-list", guest.name, "--name")  # off the source while it runs
        kill_agent(lab_agents, src)
        await asyncio.sleep(2)
    finally:
        start_agent(lab_agents, src)
    run = await finish(lab_agents, src, task["taskUuid"], within_s=400)

    assert run.state == "SUCCEEDED", run.task.get("error")
    assert guest.where() == {"hostB": "running"}
    assert_snapshots_at(dst, guest, str(dst.root("ps1").path), before)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output
