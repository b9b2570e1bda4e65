"""Live moves across hosts between kinds of storage (issue 25): a running guest carried from hostA's files
onto the shared Ceph pool at hostB, on to the second pool back at hostA, onto hostB's files, onto hostA's
block devices and back onto hostB's files, each move one libvirt migration whose disk mirrors write the
destination's volume once (an RBD image the destination agent made thin, a device it picked). Checked from
outside the agents: where libvirt runs the domain, the volumes its live and persistent XML name, the RBD
images' use, the devices, every acknowledged guest write read back and the guest's memory checker after each
switchover. And the refusals and the cleanup: a destination whose libvirt lacks the pool's secret is refused
before anything is copied, naming the secret; a cancelled move onto the pool leaves no image behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentapi import Run, disk_sources, migrate, start
from faultkit import assert_no_loss, finish, kill_agent, lab_restored, start_agent, wait_for_progress
from labtools import Guest, Lab, LabHost

from agent.storage import blockdir
from labkit import ceph
from labkit.agents import agent_client
from labkit.bodies import dst_host, migration_body
from labkit.layout import BLOCK_ROOT, host_by_name
from labkit.state import LabState
from labkit.waits import wait_until

pytestmark = pytest.mark.lab
__all__ = ["lab_restored"]  # the fixture, imported so that a case can ask for it

MiB = 1 << 20
#: Objects beyond the source's data an image may use (as on one host, test_kinds_samehost.py): three objects
#: of zeros after the first, and the guest's records written since the source was read.
EXTRA_OBJECTS = 4


@pytest.fixture
def taken_devices(lab: Lab) -> Iterator[list[tuple[LabHost, Path]]]:
    """Block devices a test's moves took, on either host: given back blank at teardown, after the guests."""
    taken: list[tuple[LabHost, Path]] = []
    yield taken
    for _host, device in taken:
        blockdir.release(device)


def _body(storage_uuid: str, dst: LabHost, **extra: Any) -> dict[str, Any]:
    return migration_body(
        storage_uuid, dstHostUuid=dst.uuid, dstHost=dst_host(dst), withDataVolumes=True, downTime=500, **extra
    )


async def _move(lab: Lab, guest: Guest, src: LabHost, dst: LabHost, storage_uuid: str, **extra: Any) -> Run:
    """One move across hosts that must succeed: the domain runs on ``dst`` only, its live and persistent
    definitions name the same volumes, and every acknowledged write is there (memory checker included)."""
    run = await migrate(lab, src, guest.uuid, _body(storage_uuid, dst, **extra))
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert guest.where() == {dst.name: "running"}, guest.where()
    live, defined = disk_sources(dst, guest.name), disk_sources(dst, guest.name, inactive=True)
    assert live == defined and set(live) == {"vda", "vdb"}, (live, defined)
    placed = run.task["details"]["placed"]  # where the destination agent said it put each disk
    assert {t: p.removeprefix("rbd:") for t, p in placed.items()} == live, (placed, live)
    disks = run.task["details"]["plan"]["disks"]
    print(
        f"{src.name} -> {dst.name}: "
        + ", ".join(f"{d['target']} {d['fromKind']} {d['from']} -> {d['toKind']} {d['to']}" for d in disks)
    )
    assert_no_loss(guest)
    return run


def _rbd_used(live: dict[str, str]) -> dict[str, int]:
    """Bytes each RBD disk's image uses (``pool/image`` as libvirt names it)."""
    return {t: ceph.rbd_used_bytes(p.split("/", 1)[1], p.split("/", 1)[0]) for t, p in live.items()}


async def test_a_running_guest_tours_rbd_block_and_files_across_hosts(
    lab_agents: Lab,
    taken_images: list[str],
    taken_devices: list[tuple[LabHost, Path]],
    make_guest: Callable[..., Guest],
) -> None:
    a, b = lab_agents.host("hostA"), lab_agents.host("hostB")
    pool = lab_agents.ceph
    guest = make_guest(data_volumes=1, snapshots=1, fill_mib=32)
    guest.wait_for_acks(10)
    before = disk_sources(a, guest.name)
    data = {t: ceph.objects_with_data(p) for t, p in before.items()}

    # files (a two-layer chain each) -> RBD, across hosts: flattened, said so, thin.
    run = await _move(lab_agents, guest, a, b, pool.storage_uuid, withSnapshots=True)
    live = disk_sources(b, guest.name)
    taken_images.extend(live.values())
    assert all(p.startswith(f"{pool.pool}/") for p in live.values()), live
    plan = run.task["details"]["plan"]
    assert all(d["toKind"] == "rbd" and d["flatten"] for d in plan["disks"]), plan
    assert len(plan["notes"]) == 2 and all("flattened" in n for n in plan["notes"]), plan
    assert b.virsh("dumpxml", guest.name).count("<secret type='ceph'") == 2
    b.virsh("suspend", guest.name)
    try:
        used = _rbd_used(live)
    finally:
        b.virsh("resume", guest.name)
    for target, n in used.items():
        print(
            f"{target}: RBD uses {n / MiB:.0f} MiB, the source's data {data[target] / MiB:.0f} MiB of objects"
        )
        assert 0.95 * data[target] <= n <= 1.05 * data[target] + EXTRA_OBJECTS * ceph.RBD_OBJECT, (target, n)

    # RBD -> the second pool, back to hostA: image to image, as thin.
    await _move(lab_agents, guest, b, a, pool.storage2_uuid)
    live = disk_sources(a, guest.name)
    taken_images.extend(live.values())
    assert all(p.startswith(f"{pool.pool2}/") for p in live.values()), live
    a.virsh("suspend", guest.name)
    try:
        used2 = _rbd_used(live)
    finally:
        a.virsh("resume", guest.name)
    for target, n in used2.items():
        print(f"{target}: {n / MiB:.0f} MiB in {pool.pool2}, {used[target] / MiB:.0f} MiB in {pool.pool}")
        assert n <= used[target] + 2 * ceph.RBD_OBJECT, (target, n, used[target])

    # RBD -> files on hostB: sparse raw files holding the images' data.
    files = b.root("ps1")
    await _move(lab_agents, guest, a, b, files.uuid)
    live = disk_sources(b, guest.name)
    for target, path in live.items():
        assert Path(path).parent == files.path and Path(path).is_file(), live
        allocated = os.stat(path).st_blocks * 512
        print(f"{target}: {path} holds {allocated / MiB:.0f} MiB")
        assert allocated <= used2[target] + 2 * ceph.RBD_OBJECT, (target, allocated)

    # files -> hostA's block devices: each disk a slice of a free device.
    blk = a.root(BLOCK_ROOT)
    run = await _move(lab_agents, guest, b, a, blk.uuid)
    live = disk_sources(a, guest.name)
    taken_devices.extend((a, Path(p)) for p in live.values())
    assert all(Path(p).parent == blk.path and Path(p).resolve().is_block_device() for p in live.values()), (
        live
    )
    xml = a.virsh("dumpxml", "--inactive", guest.name)
    assert xml.count("<disk type='block'") == 2 and xml.count("<slice type='storage'") == 2, xml
    assert all(d["toKind"] == "block" for d in run.task["details"]["plan"]["disks"])

    # block devices -> files on hostB (another root: the files of the move before are still in ps1, the
    # management plane's to delete).
    files2 = b.root("ps2")
    await _move(lab_agents, guest, a, b, files2.uuid)
    live = disk_sources(b, guest.name)
    assert all(Path(p).parent == files2.path and Path(p).is_file() for p in live.values()), live


async def test_a_destination_without_the_ceph_secret_is_refused_before_anything_is_copied(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """hostB's libvirt loses the pool's secret: a move from hostA onto the pool is refused in PREPARING by
    hostB's agent, naming the secret; nothing is made in the pool, the guest runs on hostA from its files."""
    a, b = lab_agents.host("hostA"), lab_agents.host("hostB")
    pool = lab_agents.ceph
    guest = make_guest(bare=True)
    before, images = disk_sources(a, guest.name), ceph.rbd_images()
    b.virsh("secret-undefine", pool.secret_uuid)
    try:
        run = await migrate(lab_agents, a, guest.uuid, _body(pool.storage_uuid, b))
        assert run.state == "FAILED", run.task
        error = run.task["error"]
        assert error["code"] == "AGENT.CEPH_ACCESS" and pool.secret_uuid in error["description"], error
        assert "COPYING" not in run.states, run.states
    finally:
        lab_state = LabState.load()
        assert lab_state is not None
        ceph.ensure_secret(host_by_name("hostB"), lab_state.ceph)
    assert guest.where() == {"hostA": "running"} and disk_sources(a, guest.name) == before
    assert ceph.rbd_images() == images


async def test_a_cancelled_move_onto_rbd_across_hosts_leaves_no_image(
    lab_agents: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    """Cancelled while its mirrors copy onto the pool (capped): the guest runs on hostA from its files, every
    acknowledged write there, and the images hostB's agent made are gone."""
    a, b = lab_agents.host("hostA"), lab_agents.host("hostB")
    pool = lab_agents.ceph
    guest = make_guest(data_volumes=1, fill_mib=96)
    guest.wait_for_acks(10)
    before, images = disk_sources(a, guest.name), set(ceph.rbd_images())
    task = await start(lab_agents, a, guest.uuid, _body(pool.storage_uuid, b, bandwidth=10))
    await wait_for_progress(lab_agents, a, task["taskUuid"], 10)
    made = set(ceph.rbd_images()) - images
    taken_images.extend(f"{pool.pool}/{n}" for n in made)
    assert len(made) == 2, made  # hostB's agent made one image per disk, being written now
    async with agent_client(lab_agents, a) as agent:
        await agent.cancel(task["taskUuid"])
    run = await finish(lab_agents, a, task["taskUuid"])
    assert run.state == "CANCELLED", run.task.get("error")
    assert "CONVERGING" not in run.states, run.states
    assert guest.where() == {"hostA": "running"} and disk_sources(a, guest.name) == before
    left = set(ceph.rbd_images()) & made
    assert not left, f"images of a cancelled move left in the pool: {left}"
    assert_no_loss(guest)


async def _strike_a_move_onto_rbd(
    lab: Lab, taken_images: list[str], make_guest: Callable[..., Guest], strike: Callable[[], Awaitable[str]]
) -> None:
    """A writing guest's two disks moved from hostA's files onto the pool at hostB at 8 MiB/s; at 20 % the
    ``strike`` (it says what it did); then the verdict is where the guest runs: SUCCEEDED on hostB from the
    images hostB's agent made, or FAILED on hostA from its files with those images gone (hostB's agent
    removes them once it knows); no acknowledged write lost."""
    a, b = lab.host("hostA"), lab.host("hostB")
    pool = lab.ceph
    guest = make_guest(data_volumes=1, fill_mib=64)
    guest.wait_for_acks(10)
    before, images = disk_sources(a, guest.name), set(ceph.rbd_images())
    task = await start(lab, a, guest.uuid, _body(pool.storage_uuid, b, bandwidth=8))
    await wait_for_progress(lab, a, task["taskUuid"], 20)
    made = set(ceph.rbd_images()) - images
    taken_images.extend(f"{pool.pool}/{name}" for name in made)
    assert len(made) == 2, made
    what = await strike()
    run = await finish(lab, a, task["taskUuid"])
    print(f"{what}: {run.state} {run.task.get('error')}")
    if run.state == "SUCCEEDED":
        assert guest.where() == {"hostB": "running"}, guest.where()
        live = disk_sources(b, guest.name)
        assert {p.split("/", 1)[1] for p in live.values()} == made, (live, made)
    else:
        assert guest.where() == {"hostA": "running"} and disk_sources(a, guest.name) == before
        await wait_until(
            lambda: not set(ceph.rbd_images()) & made, "hostB's agent removing the images it made", within=60
        )
    assert_no_loss(guest)


async def test_the_destination_agent_killed_mid_copy_onto_rbd_settles_the_truth(
    lab_restored: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    """hostB's agent is killed (SIGKILL) while the mirrors write into the images it made, and started again
    10 s later: its record names the images, the source's verdict is the truth, and what the move made is
    kept (the VM runs from it) or removed (it does not)."""
    b = lab_restored.host("hostB")

    async def kill() -> str:
        kill_agent(lab_restored, b)
        await asyncio.sleep(10)
        start_agent(lab_restored, b)
        return "hostB's agent killed, started again 10 s later"

    await _strike_a_move_onto_rbd(lab_restored, taken_images, make_guest, kill)
