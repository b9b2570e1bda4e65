"""Live moves on one host between kinds of storage (issue 25): a running guest's qcow2 files onto the host's
block devices and back to files, and onto the lab's Ceph pool, on to its second pool and back to files,
checked from outside the agent: libvirt's
live and persistent XML name the new volumes, every acknowledged guest write is read back from the device or
the RBD image (`guest verify`), the RBD image is as thin as the source's data, and what a move took (a
device, an image) is given back when the test ends."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentapi import disk_sources, images_identical, migrate, qemu_img_chain, start
from faultkit import assert_no_loss, finish, kill_agent, lab_restored, start_agent, wait_for_progress
from labtools import Guest, Lab

from agent.storage import blockdir
from labkit import ceph
from labkit.bodies import migration_body
from labkit.layout import BLOCK_ROOT, host_by_name
from labkit.state import LabState

pytestmark = pytest.mark.lab
__all__ = ["lab_restored"]  # the fixture, imported so that a case can ask for it

MiB = 1 << 20
#: Objects beyond the source's data an image may use: three objects of zeros right after the first (4-16
#: MiB) in every move measured, whatever the disk's data (docs/storage.md: not explained yet), and one for
#: the guest's records written between the switch and the pool's reading.
EXTRA_OBJECTS = 4
#: The cap of the move back from RBD (MiB/s), and QEMU's mirror buffer: what a mirror may have in flight.
CAP_MIB, BUFFER = 50, 16 * MiB
#: A stopped guest's disks, written whole onto the block storage's devices (1088 MiB; the holes as zeros):
#: smaller than the lab guest's 1 GiB, for the suite's time.
SMALL_DISK = 256 * MiB


@pytest.fixture
def taken_devices(lab: Lab) -> Iterator[list[Path]]:
    """Block devices a test's moves took: given back blank at teardown (after the test's guests are gone,
    since this fixture is asked for before ``make_guest``)."""
    taken: list[Path] = []
    yield taken
    for device in taken:
        blockdir.release(device)


def _image_info(path: str) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(out))


async def test_a_running_guest_moves_onto_block_devices_and_back(
    lab_agents: Lab, taken_devices: list[Path], make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    blk, files = host.root(BLOCK_ROOT), host.root("ps1")
    guest = make_guest(data_volumes=1, fill_mib=32)
    guest.wait_for_acks(10)

    run = await migrate(lab_agents, host, guest.uuid, migration_body(blk.uuid, withDataVolumes=True))
    assert run.state == "SUCCEEDED", run.task.get("error")
    live, defined = disk_sources(host, guest.name), disk_sources(host, guest.name, inactive=True)
    assert set(live) == {"vda", "vdb"} and live == defined, (live, defined)
    devices = [Path(p) for p in live.values()]
    taken_devices.extend(devices)
    assert all(d.parent == blk.path and d.resolve().is_block_device() for d in devices), live
    kinds = {d["target"]: (d["toKind"], d["to"]) for d in run.task["details"]["plan"]["disks"]}
    assert kinds == {t: ("block", p) for t, p in live.items()}, kinds
    assert host.virsh("dumpxml", guest.name).count("<disk type='block'") == 2
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output

    back = await migrate(lab_agents, host, guest.uuid, migration_body(files.uuid, withDataVolumes=True))
    assert back.state == "SUCCEEDED", back.task.get("error")
    live = disk_sources(host, guest.name)
    assert all(Path(p).parent == files.path and Path(p).is_file() for p in live.values()), live
    assert live == disk_sources(host, guest.name, inactive=True)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output


async def test_a_running_guest_moves_onto_rbd_thin_with_its_chain_flattened(
    lab_agents: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    pool = lab_agents.ceph
    guest = make_guest(data_volumes=1, snapshots=1, fill_mib=32)
    guest.wait_for_acks(10)
    before = disk_sources(host, guest.name)

    body = migration_body(pool.storage_uuid, withDataVolumes=True)  # the chain flattened into the image
    run = await migrate(lab_agents, host, guest.uuid, body)
    assert run.state == "SUCCEEDED", run.task.get("error")
    live, defined = disk_sources(host, guest.name), disk_sources(host, guest.name, inactive=True)
    assert live == defined and set(live) == {"vda", "vdb"}, (live, defined)
    assert all(p.startswith(f"{pool.pool}/") for p in live.values()), live
    taken_images.extend(live.values())
    plan = run.task["details"]["plan"]
    assert {d["target"]: d["to"] for d in plan["disks"]} == {t: f"rbd:{p}" for t, p in live.items()}
    assert all(d["toKind"] == "rbd" and d["flatten"] for d in plan["disks"]), plan
    assert host.virsh("dumpxml", guest.name).count("<secret type='ceph'") == 2

    # Thin: each image uses the objects its source's data falls in (the source files stay, frozen at the
    # switch), and a few more (EXTRA_OBJECTS; the guest is paused while the pool is read). Thick, the images
    # would use their whole 1 GiB.
    host.virsh("suspend", guest.name)
    try:
        for target, image in live.items():
            used = ceph.rbd_used_bytes(image.split("/", 1)[1])
            data = ceph.objects_with_data(before[target])
            print(
                f"{target}: RBD uses {used / MiB:.0f} MiB, the source's data {data / MiB:.0f} MiB of objects"
            )
            assert 0.95 * data <= used <= 1.05 * data + EXTRA_OBJECTS * ceph.RBD_OBJECT, (target, used, data)
    finally:
        host.virsh("resume", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output

    # On to the cluster's second pool, then back to files: the images' data is mapped through the guest's
    # own QEMU (the agent holds no Ceph key), so the budget is charged for the data, not for the 1 GiB each
    # image spans. The same moves capped, and judged by their rate, are a `rates` case (below).
    images = await _pool_to_pool_then_files(lab_agents, guest, taken_images, cap=None)
    print(f"the images used {sum(images.values()) / MiB:.0f} MiB in the second pool")


async def _pool_to_pool_then_files(
    lab: Lab, guest: Guest, taken_images: list[str], cap: int | None
) -> dict[str, int]:
    """The guest's RBD disks (first pool) onto the second pool, then onto files, at ``cap`` MiB/s: each image
    uses no more than its source did, each move is charged its data (one mirror buffer per disk aside), the
    files hold the images' data, every acknowledged record is read back. Returns the second pool's use."""
    host, pool = lab.host("hostA"), lab.ceph
    live = disk_sources(host, guest.name)
    images = {t: ceph.rbd_used_bytes(p.split("/", 1)[1]) for t, p in live.items()}
    body = migration_body(pool.storage2_uuid, withDataVolumes=True, bandwidth=cap)
    across = await migrate(lab, host, guest.uuid, body)
    assert across.state == "SUCCEEDED", across.task.get("error")
    first, live = live, disk_sources(host, guest.name)
    assert live == disk_sources(host, guest.name, inactive=True), live
    assert all(p.startswith(f"{pool.pool2}/") for p in live.values()), live
    taken_images.extend(live.values())
    plan = across.task["details"]["plan"]
    assert all(d["fromKind"] == d["toKind"] == "rbd" for d in plan["disks"]), plan
    _charged("pool -> pool", across.task, images)
    for target, image in live.items():
        used = ceph.rbd_used_bytes(image.split("/", 1)[1], pool.pool2)
        print(f"{target}: {first[target]} used {images[target] / MiB:.0f} MiB, {image} {used / MiB:.0f} MiB")
        assert used <= images[target] + ceph.RBD_OBJECT, (target, used, images[target])
    images = {t: ceph.rbd_used_bytes(p.split("/", 1)[1], pool.pool2) for t, p in live.items()}
    files = host.root("ps2")
    back = await migrate(
        lab, host, guest.uuid, migration_body(files.uuid, withDataVolumes=True, bandwidth=cap)
    )
    assert back.state == "SUCCEEDED", back.task.get("error")
    live, defined = disk_sources(host, guest.name), disk_sources(host, guest.name, inactive=True)
    assert live == defined and all(Path(p).parent == files.path for p in live.values()), (live, defined)
    plan = back.task["details"]["plan"]
    assert all(d["fromKind"] == "rbd" and d["toKind"] == "file" for d in plan["disks"]), plan
    _charged("RBD -> files", back.task, images)
    for target, path in live.items():
        allocated = Path(path).stat().st_blocks * 512
        print(f"{target}: {allocated / MiB:.0f} MiB in {path}, the image used {images[target] / MiB:.0f}")
        assert allocated <= images[target] + BUFFER, (target, allocated, images[target])
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output
    return images


def _charged(step: str, task: dict[str, Any], images: dict[str, int]) -> None:
    """The move was charged the images' data (plus a buffer per mirror), and, capped, held its cap."""
    budget = task["details"]["budget"]
    moved = sum(images.values())
    print(f"{step}: {budget['realBytes'] / MiB:.0f} MiB charged, the images use {moved / MiB:.0f} MiB")
    print(f"  budget {budget}, copy rates {task['details'].get('copyRates')}")
    assert budget["realBytes"] <= 1.1 * moved + len(images) * BUFFER, budget
    assert "overBudget" not in task["details"], task["details"]["overBudget"]


@pytest.mark.rates
async def test_a_guest_born_on_rbd_moves_pool_to_pool_and_onto_files_within_its_cap(
    lab_agents: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    """A guest created on the pool, with a data volume: onto the second pool, then onto files, each move
    capped at CAP_MIB: charged for the images' data and within the cap (a rate judged: run alone)."""
    guest = make_guest(storage="rbd", data_volumes=1, fill_mib=32)
    guest.wait_for_acks(10)
    await _pool_to_pool_then_files(lab_agents, guest, taken_images, cap=CAP_MIB)


async def test_a_chain_moved_onto_rbd_with_its_snapshots_keeps_them_as_rbd_snapshots(
    lab_agents: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    """``withSnapshots`` onto the pool: each lower layer is written into the disk's image and snapshotted
    there, oldest first, then the top mirrored shallow onto it. Checked from outside: the image's snapshots
    (``rbd snap ls``), each snapshot's content equal to its source layer with the layers below it, the head
    the guest's disk (every acknowledged record read back), the inventory listing the snapshots."""
    host, pool = lab_agents.host("hostA"), lab_agents.ceph
    guest = make_guest(data_volumes=1, snapshots=2, fill_mib=16)
    guest.wait_for_acks(10)
    before = disk_sources(host, guest.name)
    lower = {t: [layer["filename"] for layer in reversed(qemu_img_chain(p)[1:])] for t, p in before.items()}
    assert all(len(chain) == 2 for chain in lower.values()), lower

    body = migration_body(pool.storage_uuid, withDataVolumes=True, withSnapshots=True)
    run = await migrate(lab_agents, host, guest.uuid, body)
    assert run.state == "SUCCEEDED", run.task.get("error")
    live = disk_sources(host, guest.name)
    taken_images.extend(live.values())
    assert live == disk_sources(host, guest.name, inactive=True) and set(live) == {"vda", "vdb"}, live
    plan = run.task["details"]["plan"]
    assert all(d["toKind"] == "rbd" and not d["flatten"] for d in plan["disks"]), plan
    assert len(plan["notes"]) == 2 and all("kept as snapshots" in n for n in plan["notes"]), plan
    inventory = {v["deviceName"]: v for v in run.task["inventory"]["volumes"]}
    for target, spec in live.items():
        name = spec.split("/", 1)[1]
        snaps = json.loads(ceph.rbd("snap", "ls", "--format", "json", spec))
        want = [Path(layer).name.split(".")[0] for layer in lower[target]]
        assert [s["name"] for s in sorted(snaps, key=lambda s: s["id"])] == want, (target, snaps)
        for snap, layer in zip(want, lower[target], strict=True):
            assert images_identical(layer, ceph.qemu_uri(f"{name}@{snap}")), (target, snap, layer)
        chain = [b["installPath"] for b in inventory[target]["backingChain"]]
        assert chain == [f"rbd:{spec}@{snap}" for snap in reversed(want)], inventory[target]
        print(f"{target}: {spec} keeps {', '.join(want)}")
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output


async def test_a_running_guest_moves_from_rbd_onto_block_devices(
    lab_agents: Lab,
    taken_devices: list[Path],
    taken_images: list[str],
    make_guest: Callable[..., Guest],
) -> None:
    """Files -> RBD -> block devices, live: the images' data mapped through the guest's QEMU, each written
    onto a free device with a slice of the disk's size; every acknowledged record read back from the
    devices."""
    host = lab_agents.host("hostA")
    blk = host.root(BLOCK_ROOT)
    guest = make_guest(data_volumes=1, fill_mib=32)
    guest.wait_for_acks(10)
    body = migration_body(lab_agents.ceph.storage_uuid, withDataVolumes=True)
    onto = await migrate(lab_agents, host, guest.uuid, body)
    assert onto.state == "SUCCEEDED", onto.task.get("error")
    images = disk_sources(host, guest.name)
    taken_images.extend(images.values())

    run = await migrate(lab_agents, host, guest.uuid, migration_body(blk.uuid, withDataVolumes=True))
    assert run.state == "SUCCEEDED", run.task.get("error")
    live, defined = disk_sources(host, guest.name), disk_sources(host, guest.name, inactive=True)
    assert set(live) == {"vda", "vdb"} and live == defined, (live, defined)
    taken_devices.extend(Path(p) for p in live.values())
    assert all(Path(p).parent == blk.path and Path(p).resolve().is_block_device() for p in live.values())
    kinds = {d["target"]: (d["fromKind"], d["toKind"]) for d in run.task["details"]["plan"]["disks"]}
    assert kinds == {"vda": ("rbd", "block"), "vdb": ("rbd", "block")}, kinds
    xml = host.virsh("dumpxml", guest.name)
    assert xml.count("<disk type='block'") == 2 and xml.count("<slice type='storage'") == 2, xml
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output


async def test_a_stopped_guest_born_on_rbd_moves_pool_to_pool_and_onto_files(
    lab_agents: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    """A guest created on the pool (`guest create --storage rbd`), shut off: its images read and written by
    the agent with the pool's keyring (no QEMU runs), onto the second pool and then onto files, each copy
    compared with its source; it boots from each, every acknowledged record read back."""
    host = lab_agents.host("hostA")
    pool, files = lab_agents.ceph, host.root("ps1")
    guest = make_guest(storage="rbd", data_volumes=1, fill_mib=32)
    guest.wait_for_acks(10)
    born = disk_sources(host, guest.name)
    assert set(born) == {"vda", "vdb"} and all(p.startswith(f"{pool.pool}/") for p in born.values()), born

    host.virsh("destroy", guest.name)  # pulled plug: acknowledged writes were flushed
    run = await migrate(
        lab_agents, host, guest.uuid, migration_body(pool.storage2_uuid, withDataVolumes=True)
    )
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.task["details"]["engine"] == "offline"
    moved = disk_sources(host, guest.name, inactive=True)
    taken_images.extend(moved.values())
    assert all(p.startswith(f"{pool.pool2}/") for p in moved.values()), moved
    for target, image in moved.items():
        used, source = (
            ceph.rbd_used_bytes(image.split("/", 1)[1], pool.pool2),
            ceph.rbd_used_bytes(born[target].split("/", 1)[1]),
        )
        print(f"{target}: {image} uses {used / MiB:.0f} MiB, its source {source / MiB:.0f} MiB")
        assert used <= source + ceph.RBD_OBJECT, (target, used, source)
    host.virsh("start", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output

    host.virsh("destroy", guest.name)
    back = await migrate(lab_agents, host, guest.uuid, migration_body(files.uuid, withDataVolumes=True))
    assert back.state == "SUCCEEDED", back.task.get("error")
    defined = disk_sources(host, guest.name, inactive=True)
    assert all(Path(p).parent == files.path and Path(p).is_file() for p in defined.values()), defined
    host.virsh("start", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output


async def test_a_host_without_the_ceph_secret_is_refused_naming_it(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """hostA's libvirt loses the pool's secret: a move onto the pool is refused in PREPARING naming the
    secret, nothing made in the pool, the guest running on its files; the secret is put back after."""
    host, pool = lab_agents.host("hostA"), lab_agents.ceph
    guest = make_guest(bare=True)
    before, images = disk_sources(host, guest.name), ceph.rbd_images()
    host.virsh("secret-undefine", pool.secret_uuid)
    try:
        run = await migrate(lab_agents, host, guest.uuid, migration_body(pool.storage_uuid))
        assert run.state == "FAILED", run.task
        error = run.task["error"]
        assert error["code"] == "AGENT.CEPH_ACCESS" and pool.secret_uuid in error["description"], error
    finally:
        lab_state = LabState.load()
        assert lab_state is not None
        ceph.ensure_secret(host_by_name("hostA"), lab_state.ceph)
    assert guest.where() == {"hostA": "running"} and disk_sources(host, guest.name) == before
    assert ceph.rbd_images() == images


async def _strike_a_copy_onto_rbd(
    lab: Lab,
    taken_images: list[str],
    make_guest: Callable[..., Guest],
    strike: Callable[[], Awaitable[str]],
) -> None:
    """A writing guest's two disks copied onto the pool at 8 MiB/s (64 MiB of data each); at 20 % the
    ``strike`` (it says what it did); then the verdict is where the guest runs: SUCCEEDED on the images
    the move made, or FAILED on its files with those images gone; no acknowledged write lost."""
    host, pool = lab.host("hostA"), lab.ceph
    guest = make_guest(data_volumes=1, fill_mib=64)
    guest.wait_for_acks(10)
    before, images = disk_sources(host, guest.name), set(ceph.rbd_images())
    body = migration_body(pool.storage_uuid, withDataVolumes=True, bandwidth=8)
    task = await start(lab, host, guest.uuid, body)
    await wait_for_progress(lab, host, task["taskUuid"], 20)
    made = set(ceph.rbd_images()) - images
    taken_images.extend(f"{pool.pool}/{name}" for name in made)
    assert len(made) == 2, made
    what = await strike()
    run = await finish(lab, host, task["taskUuid"])
    live, defined = disk_sources(host, guest.name), disk_sources(host, guest.name, inactive=True)
    assert live == defined and guest.where() == {"hostA": "running"}, (live, defined)
    print(f"{what}: {run.state} {run.task.get('error')}; disks {live}")
    if run.state == "SUCCEEDED":
        assert {p.split("/", 1)[1] for p in live.values()} == made, (live, made)
    else:
        assert live == before and set(ceph.rbd_images()) == images, (live, ceph.rbd_images())
    assert_no_loss(guest)


async def test_the_agent_killed_mid_copy_onto_rbd_settles_the_truth(
    lab_restored: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    """The agent is killed (SIGKILL) while its mirrors copy onto the pool and started again: the journal
    names the images it made, the restarted agent takes the task up, the verdict is the truth."""
    host = lab_restored.host("hostA")

    async def kill() -> str:
        kill_agent(lab_restored, host)
        start_agent(lab_restored, host)
        return "the agent killed and started again"

    await _strike_a_copy_onto_rbd(lab_restored, taken_images, make_guest, kill)


async def test_a_stopped_guest_moves_onto_rbd_keeping_its_snapshots_and_boots_from_the_images(
    lab_agents: Lab, taken_images: list[str], make_guest: Callable[..., Guest]
) -> None:
    """A shut-off VM with two-layer chains onto the pool with ``withSnapshots``: each base written into a
    new image and snapshotted, the top written over it (the agent's own copy, with the pool's keyring),
    compared; the definition names the images; it boots from them, every acknowledged record read back."""
    host, pool = lab_agents.host("hostA"), lab_agents.ceph
    guest = make_guest(data_volumes=1, snapshots=1, fill_mib=32)
    guest.wait_for_acks(10)
    host.virsh("destroy", guest.name)
    before = disk_sources(host, guest.name, inactive=True)
    bases = {t: qemu_img_chain(p)[1]["filename"] for t, p in before.items()}
    body = migration_body(pool.storage_uuid, withDataVolumes=True, withSnapshots=True)
    run = await migrate(lab_agents, host, guest.uuid, body)
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.task["details"]["engine"] == "offline"
    defined = disk_sources(host, guest.name, inactive=True)
    taken_images.extend(defined.values())
    assert all(p.startswith(f"{pool.pool}/") for p in defined.values()), defined
    for target, spec in defined.items():
        name = spec.split("/", 1)[1]
        snaps = [s["name"] for s in json.loads(ceph.rbd("snap", "ls", "--format", "json", spec))]
        want = Path(bases[target]).name.split(".")[0]
        assert snaps == [want], (target, snaps)
        assert images_identical(bases[target], ceph.qemu_uri(f"{name}@{want}")), target
        assert images_identical(before[target], ceph.qemu_uri(name)), target
    host.virsh("start", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output


async def test_a_stopped_guest_moves_onto_block_devices_and_boots_from_them(
    lab_agents: Lab, taken_devices: list[Path], make_guest: Callable[..., Guest]
) -> None:
    """A shut-off VM's chains written raw onto free devices (flattened, said so), compared, the definition
    pointing at the devices; then back onto files."""
    host = lab_agents.host("hostA")
    blk = host.root(BLOCK_ROOT)
    guest = make_guest(data_volumes=1, snapshots=1, fill_mib=32, disk_size_mib=SMALL_DISK // MiB)
    guest.wait_for_acks(10)
    host.virsh("destroy", guest.name)  # pulled plug: acknowledged writes were fsync'd

    body = migration_body(blk.uuid, withDataVolumes=True, withSnapshots=True)
    run = await migrate(lab_agents, host, guest.uuid, body)
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.task["details"]["engine"] == "offline"
    defined = disk_sources(host, guest.name, inactive=True)
    devices = [Path(p) for p in defined.values()]
    taken_devices.extend(devices)
    assert set(defined) == {"vda", "vdb"} and all(d.parent == blk.path for d in devices), defined
    xml = host.virsh("dumpxml", "--inactive", guest.name)
    assert xml.count("<disk type='block'") == 2 and xml.count("<slice type='storage'") == 2, xml
    plan = run.task["details"]["plan"]
    assert all(d["toKind"] == "block" and d["flatten"] for d in plan["disks"]), plan
    host.virsh("start", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output

    # Off the devices again, stopped: each read through its slice (the guest's size, not the device's),
    # its zeros left out of the file.
    host.virsh("destroy", guest.name)
    files = host.root("ps1")
    back = await migrate(lab_agents, host, guest.uuid, migration_body(files.uuid, withDataVolumes=True))
    assert back.state == "SUCCEEDED", back.task.get("error")
    assert back.task["details"]["engine"] == "offline"
    assert all(
        d["fromKind"] == "block" and d["toKind"] == "file" for d in back.task["details"]["plan"]["disks"]
    )
    moved = disk_sources(host, guest.name, inactive=True)
    for target, path in moved.items():
        assert Path(path).parent == files.path and Path(path).is_file(), moved
        info = _image_info(path)
        used = info["actual-size"]
        print(f"{target}: {path}, {info['virtual-size'] / MiB:.0f} MiB, {used / MiB:.0f} MiB used")
        assert info["virtual-size"] == SMALL_DISK and info["actual-size"] < SMALL_DISK / 2, info
    host.virsh("start", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output
