"""The ZStack dialect against the real lab (issue 10): a fake ZStack management server on the lab bridge
(10.213.0.1, reachable from the agents' namespaces) sends realistic commands, pre-creates the target volumes
as ZStack does, and records the callbacks and progress reports; the writing guest must lose nothing."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from agentapi import disk_sources, qemu_img_chain
from labtools import Guest, Lab, LabHost

from agent.client import ApiError
from labkit import ceph
from labkit.agents import agent_client
from labkit.mgmtplane import Call, ManagementPlane
from labkit.waits import wait_until

pytestmark = pytest.mark.lab

ZS_HOST = {"hostA": "a0c0b6f1d2e34f5a8b9c0d1e2f3a4b01", "hostB": "a0c0b6f1d2e34f5a8b9c0d1e2f3a4b02"}
MiB = 1 << 20
CANCELLED = "AGENT.CANCELLED: the migration was cancelled on request; the VM keeps its source volumes"


class ManagementServer(ManagementPlane):
    """ZStack's side: its callback path and the command path the agents send progress reports to."""

    CALLBACK = "/zstack/asyncrest/callback"
    COMMAND = "/zstack/kvm/command"

    def __init__(self) -> None:
        super().__init__([self.CALLBACK, self.COMMAND], name="fake-zstack-mn")

    def callbacks(self, task_uuid: str) -> list[Call]:
        return self.calls(self.CALLBACK, task_uuid)

    def progress(self, api: str) -> list[Call]:
        return [c for c in self.calls(self.COMMAND) if c.body["threadContextMap"]["api"] == api]

    async def answer(self, task_uuid: str, within: float = 300) -> Call:
        await wait_until(
            lambda: bool(self.callbacks(task_uuid)), f"the callback of {task_uuid}", within=within
        )
        return self.callbacks(task_uuid)[0]


@pytest.fixture
def mn() -> Iterator[ManagementServer]:
    with ManagementServer() as server:
        yield server


@pytest.fixture
async def http(lab: Lab) -> AsyncIterator[aiohttp.ClientSession]:
    # One connection per call: an agent restarted by a test must not meet a stale keep-alive connection.
    # A TLS lab's agents are verified with the lab CA.
    context = ssl.create_default_context(cafile=lab.raw.get("caFile"))
    connector = aiohttp.TCPConnector(force_close=True, ssl=context)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


# -- ZStack's commands ----------------------------------------------------------------------------------


def context(api: str, stage: str = "0-100") -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    return {
        "threadContext": {"api": api, "task-name": "MigrateVm", "task-stage": stage},
        "threadContextStack": [],
        "taskContext": {"__messagetimeout__": "1800000", "__messagedeadline__": str(now_ms + 1_800_000)},
        "kvmHostAddons": {},
    }


def volume_to(path: str, kind: str) -> dict[str, Any]:
    return {
        "installPath": path,
        "deviceId": 0 if kind == "Root" else 1,
        "deviceType": "file",
        "volumeUuid": os.path.basename(path).split(".")[0].replace("-", ""),
        "useVirtio": True,
        "useVirtioSCSI": False,
        "shareable": False,
        "cacheMode": "none",
        "wwn": "0x5000c29c1a2b3c4d",
        "bootOrder": 1 if kind == "Root" else 0,
        "physicalBlockSize": 0,
        "type": kind,
        "format": "qcow2",
        "primaryStorageType": "LocalStorage",
    }


async def post(
    http: aiohttp.ClientSession, host: LabHost, path: str, body: dict[str, Any], mn: ManagementServer | None
) -> tuple[int, bytes, str | None]:
    """A ZStack call: asynchronous (taskuuid, callbackurl) when ``mn`` is given; returns the taskuuid."""
    task_uuid = uuid.uuid4().hex if mn is not None else None
    headers = {} if mn is None else {"taskuuid": task_uuid or "", "callbackurl": mn.url(mn.CALLBACK)}
    async with http.post(f"{host.agent_url}{path}", json=body, headers=headers) as resp:
        return resp.status, await resp.read(), task_uuid


async def send(
    http: aiohttp.ClientSession, host: LabHost, path: str, body: dict[str, Any], mn: ManagementServer
) -> str:
    status, raw, task_uuid = await post(http, host, path, body, mn)
    assert status == 200 and raw == b"", raw
    assert task_uuid is not None
    return task_uuid


async def connect(http: aiohttp.ClientSession, host: LabHost, mn: ManagementServer) -> None:
    body = {"hostUuid": ZS_HOST[host.name], "sendCommandUrl": mn.url(mn.COMMAND), **context("api-connect")}
    status, raw, _ = await post(http, host, "/host/connect", body, None)
    answer = json.loads(raw)
    assert status == 200 and answer["success"] is True, answer
    assert answer["libvirtVersion"] and answer["qemuVersion"]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)


def migrate_cmd(
    guest: Guest,
    src: LabHost,
    dst: LabHost,
    targets: dict[str, str],
    api: str,
    policy: str = "FullCopy",
    stage: str = "0-100",
) -> dict[str, Any]:
    """ZStack's `/vm/migrate` of ``guest`` to ``dst``: each disk (by target) onto its ``targets`` volume."""
    before = disk_sources(src, guest.name)
    return {
        "vmUuid": guest.uuid.replace("-", ""),
        "destHostIp": dst.migration_address,
        "destHostManagementIp": dst.address,
        "srcHostIp": src.address,
        "storageMigrationPolicy": policy,
        "disks": {before[t]: volume_to(targets[t], "Root" if t == "vda" else "Data") for t in targets},
        "bandwidth": 200,
        "downTime": 500,
        "autoConverge": False,
        "xbzrle": False,
        "reload": False,
        "useNuma": False,
        "migrateFromDestination": False,
        "nics": [],
        "vdpaPaths": [],
        **context(api, stage),
    }


def precreate(path: str, size: int, backing: str | None = None) -> str:
    """What ZStack's primary storage does before it migrates: an empty target volume."""
    if backing is None:
        qemu_img("create", "-q", "-f", "qcow2", path, str(size))
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path, str(size))
    return path


def copy_sparse(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def virtual_size(path: str) -> int:
    return int(qemu_img_chain(path)[0]["virtual-size"])


def new_path(host: LabHost, storage: str) -> str:
    return str(host.root(storage).path / f"{uuid.uuid4()}.qcow2")


def blk_body(
    vm_uuid: str, old: str, new: str, api: str, *, bandwidth: int = 0, reload: bool = False
) -> dict[str, Any]:
    return {
        "vmUuid": vm_uuid.replace("-", ""),
        "oldVolumePath": old,
        "newVolume": volume_to(new, "Data"),
        "bandwidth": bandwidth,
        "reload": reload,
        **context(api, "10-90"),
    }


async def settled_progress(mn: ManagementServer, api: str, last: int, within: float = 30) -> list[Call]:
    """The progress reports of ``api`` once the final one (``last``) arrived (it may trail the callback)."""

    def arrived() -> bool:
        reports = mn.progress(api)
        return bool(reports) and int(reports[-1].body["progress"]) == last

    await wait_until(arrived, f"the last progress report of {api}", within=within)
    return mn.progress(api)


async def wait_copying(lab: Lab, host: LabHost, task_uuid: str) -> None:
    """Until the task is COPYING and its mirrors report bytes."""
    async with agent_client(lab, host) as agent, asyncio.timeout(120):
        while True:
            try:
                view = await agent.task(str(uuid.UUID(task_uuid)))
            except ApiError as err:  # the command becomes a task a moment after its 200
                assert err.status == 404, err
                await asyncio.sleep(0.25)
                continue
            if view["state"] == "COPYING" and view["progress"]["bytesDone"] > 0:
                return
            assert view["state"] in ("PENDING", "PREPARING", "COPYING"), view
            await asyncio.sleep(0.25)


# -- tests ----------------------------------------------------------------------------------------------


async def test_block_live_migration_onto_a_precreated_rbd_image(
    lab_agents: Lab,
    taken_images: list[str],
    make_guest: Callable[..., Guest],
    mn: ManagementServer,
    http: aiohttp.ClientSession,
) -> None:
    """ZStack's local -> Ceph move of one volume: it makes the image (`rbd create`, the disk's size), then
    sends `/vm/blklivemigration` with `ceph://pool/image`. An image of another size is refused before
    anything moves; one of the disk's size takes the disk, thin, every acknowledged record read back."""
    host, pool = lab_agents.host("hostA"), lab_agents.ceph
    guest = make_guest(data_volumes=1, fill_mib=32)
    guest.wait_for_acks(10)
    await connect(http, host, mn)
    before = disk_sources(host, guest.name)
    size = virtual_size(before["vdb"])

    small = f"zs-{uuid.uuid4().hex[:12]}"
    ceph.rbd("create", "--size", f"{size // 2 // MiB}M", f"{pool.pool}/{small}")
    taken_images.append(f"{pool.pool}/{small}")
    body = blk_body(guest.uuid, before["vdb"], f"ceph://{pool.pool}/{small}", "api-r0")
    refused = (await mn.answer(await send(http, host, "/vm/blklivemigration", body, mn))).body
    assert refused["success"] is False and refused["error"].startswith("AGENT.TARGET_MISMATCH: "), refused
    assert disk_sources(host, guest.name) == before

    image = f"zs-{uuid.uuid4().hex[:12]}"
    ceph.rbd("create", "--size", f"{size // MiB}M", f"{pool.pool}/{image}")
    taken_images.append(f"{pool.pool}/{image}")
    body = blk_body(guest.uuid, before["vdb"], f"ceph://{pool.pool}/{image}", "api-r1")
    answer = (await mn.answer(await send(http, host, "/vm/blklivemigration", body, mn))).body
    assert answer == {"success": True, "error": None}, answer
    after = disk_sources(host, guest.name)
    assert after == {**before, "vdb": f"{pool.pool}/{image}"}, after
    assert disk_sources(host, guest.name, inactive=True) == after
    used = ceph.rbd_used_bytes(image)
    print(f"vdb on {pool.pool}/{image}: {used / MiB:.0f} MiB used of {size / MiB:.0f}")
    assert used <= size // 4, "thin: the holes were not written"
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output


async def test_block_live_migration_moves_exactly_that_disk(
    lab_agents: Lab, make_guest: Callable[..., Guest], mn: ManagementServer, http: aiohttp.ClientSession
) -> None:
    host = lab_agents.host("hostA")
    guest = make_guest(data_volumes=1, snapshots=1)
    guest.wait_for_acks(10)
    await connect(http, host, mn)
    before = disk_sources(host, guest.name)

    # vdb onto a flat target: filled completely.
    flat = precreate(new_path(host, "ps2"), virtual_size(before["vdb"]))
    task_uuid = await send(
        http, host, "/vm/blklivemigration", blk_body(guest.uuid, before["vdb"], flat, "api-b1"), mn
    )
    call = await mn.answer(task_uuid)
    assert call.body == {"success": True, "error": None}
    assert call.headers["taskuuid"] == task_uuid
    after = disk_sources(host, guest.name)
    assert after == {**before, "vdb": flat}, "exactly the named disk moves"
    assert disk_sources(host, guest.name, inactive=True) == after
    assert len(qemu_img_chain(flat)) == 1
    reports = await settled_progress(mn, "api-b1", 90)
    assert all(r.headers["commandpath"] == "/progress/report" for r in reports)
    percents = [int(r.body["progress"]) for r in reports]
    assert percents == sorted(percents) and percents[-1] == 90 and max(percents[:-1], default=10) <= 89
    assert {r.body["processType"] for r in reports} == {"blockCopy"}
    assert {r.body["serverUuid"] for r in reports} == {ZS_HOST["hostA"]}

    # vda onto a target whose backing chain is in place (a copy of the source's lower layer): top only.
    chain = qemu_img_chain(before["vda"])
    base = str(host.root("ps2").path / os.path.basename(chain[1]["filename"]))
    copy_sparse(chain[1]["filename"], base)
    top = precreate(new_path(host, "ps2"), virtual_size(before["vda"]), backing=base)
    task_uuid = await send(
        http, host, "/vm/blklivemigration", blk_body(guest.uuid, before["vda"], top, "api-b2"), mn
    )
    assert (await mn.answer(task_uuid)).body == {"success": True, "error": None}
    assert disk_sources(host, guest.name) == {"vda": top, "vdb": flat}
    assert [layer["filename"] for layer in qemu_img_chain(top)] == [top, base]

    guest.wait_for_acks(20)
    result = guest.verify()
    assert result.ok, result.output
    assert result.disks == 2 and result.records > 0


async def test_migrate_full_copy_to_host_b(
    lab_agents: Lab, make_guest: Callable[..., Guest], mn: ManagementServer, http: aiohttp.ClientSession
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(data_volumes=1, snapshots=1)
    guest.wait_for_acks(10)
    await connect(http, src, mn)
    before = disk_sources(src, guest.name)
    targets = {t: precreate(new_path(dst, "ps1"), virtual_size(p)) for t, p in before.items()}
    body = migrate_cmd(guest, src, dst, targets, "api-mig", stage="5-95")
    task_uuid = await send(http, src, "/vm/migrate", body, mn)
    call = await mn.answer(task_uuid)
    assert call.body == {"success": True, "error": None}
    assert guest.where() == {"hostB": "running"}
    assert disk_sources(dst, guest.name) == targets
    assert disk_sources(dst, guest.name, inactive=True) == targets
    assert all(len(qemu_img_chain(path)) == 1 for path in targets.values()), "FullCopy flattens"
    reports = await settled_progress(mn, "api-mig", 95)
    percents = [int(r.body["progress"]) for r in reports]
    assert percents == sorted(percents) and max(percents[:-1], default=5) <= 94
    assert {r.body["processType"] for r in reports} == {"MigrateVm"}
    guest.wait_for_acks(20)
    result = guest.verify()
    assert result.ok, result.output


async def test_migrate_full_copy_onto_ceph_images_at_host_b(
    lab_agents: Lab,
    taken_images: list[str],
    make_guest: Callable[..., Guest],
    mn: ManagementServer,
    http: aiohttp.ClientSession,
) -> None:
    """ZStack moving a VM from local storage to Ceph on another host: it makes one image per volume (`rbd
    create`, the volume's size) and sends `/vm/migrate` with `ceph://pool/image` targets. The destination's
    pool is found in its agent's offer; the chains are flattened into the images, thin; the VM runs on
    hostB from them, every acknowledged record read back."""
    src, dst, pool = lab_agents.host("hostA"), lab_agents.host("hostB"), lab_agents.ceph
    guest = make_guest(data_volumes=1, snapshots=1, fill_mib=16)
    guest.wait_for_acks(10)
    await connect(http, src, mn)
    before = disk_sources(src, guest.name)
    images = {t: f"zs-{uuid.uuid4().hex[:12]}" for t in before}
    for target, name in images.items():
        ceph.rbd("create", "--size", f"{virtual_size(before[target]) // MiB}M", f"{pool.pool}/{name}")
        taken_images.append(f"{pool.pool}/{name}")
    targets = {t: f"ceph://{pool.pool}/{name}" for t, name in images.items()}
    body = migrate_cmd(guest, src, dst, targets, "api-mig-ceph", stage="5-95")
    call = await mn.answer(await send(http, src, "/vm/migrate", body, mn))
    assert call.body == {"success": True, "error": None}, call.body
    assert guest.where() == {"hostB": "running"}
    wanted = {t: f"{pool.pool}/{name}" for t, name in images.items()}
    assert disk_sources(dst, guest.name) == wanted and disk_sources(dst, guest.name, inactive=True) == wanted
    for target, name in images.items():
        used = ceph.rbd_used_bytes(name)
        print(f"{target}: {pool.pool}/{name} uses {used / MiB:.0f} MiB")
        assert used <= 64 * MiB, "thin: the holes were not written"
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok and result.disks == 2, result.output


async def test_job_cancel_cancels_a_running_one(
    lab_agents: Lab, make_guest: Callable[..., Guest], mn: ManagementServer, http: aiohttp.ClientSession
) -> None:
    host = lab_agents.host("hostA")
    guest = make_guest(data_volumes=1, fill_mib=64)
    await connect(http, host, mn)
    before = disk_sources(host, guest.name)
    target = precreate(new_path(host, "ps2"), virtual_size(before["vdb"]))
    body = blk_body(guest.uuid, before["vdb"], target, "api-cancel-me", bandwidth=4)
    task_uuid = await send(http, host, "/vm/blklivemigration", body, mn)
    await wait_copying(lab_agents, host, task_uuid)

    cancel = {"cancellationApiId": "api-cancel-me", "times": 1, "interval": 1, **context("api-cancel")}
    status, raw, _ = await post(http, host, "/job/cancel", cancel, None)
    assert status == 200 and json.loads(raw) == {"success": True, "error": None}
    call = await mn.answer(task_uuid, within=120)
    assert call.body == {"success": False, "error": CANCELLED}
    assert disk_sources(host, guest.name) == before
    assert os.path.exists(target), "the management server's target is its own: never removed"
    status, raw, _ = await post(http, host, "/job/cancel", cancel, None)
    assert json.loads(raw) == {"success": False, "error": "no matched job to cancel"}
    guest.wait_for_acks(10)
    assert guest.verify().ok


async def test_reload_after_an_agent_restart_reports_the_real_outcome(
    lab_agents: Lab, make_guest: Callable[..., Guest], mn: ManagementServer, http: aiohttp.ClientSession
) -> None:
    host = lab_agents.host("hostA")
    guest = make_guest(data_volumes=1, fill_mib=64)
    await connect(http, host, mn)
    before = disk_sources(host, guest.name)
    target = precreate(new_path(host, "ps2"), virtual_size(before["vdb"]))
    task_uuid = await send(
        http,
        host,
        "/vm/blklivemigration",
        blk_body(guest.uuid, before["vdb"], target, "api-r1", bandwidth=8),
        mn,
    )
    await wait_copying(lab_agents, host, task_uuid)
    lab_agents.agent("restart", host.name)  # the mirror keeps running in libvirt; the task resumes

    reload_body = blk_body(guest.uuid, before["vdb"], target, "api-r2", bandwidth=8, reload=True)
    reload_uuid = await send(http, host, "/vm/blklivemigration", reload_body, mn)
    reloaded = await mn.answer(reload_uuid)
    original = await mn.answer(task_uuid)

    async with agent_client(lab_agents, host) as agent:
        tasks = await agent.tasks(vm_uuid=guest.uuid)
    assert [t["taskUuid"] for t in tasks] == [str(uuid.UUID(task_uuid))], "the reload started nothing new"
    assert tasks[0]["state"] == "SUCCEEDED", tasks[0]["error"]
    assert reloaded.body == original.body == {"success": True, "error": None}
    assert disk_sources(host, guest.name)["vdb"] == target
    guest.wait_for_acks(20)
    result = guest.verify()
    assert result.ok, result.output


async def test_migrate_inc_copy_needs_and_keeps_the_chain_in_place(
    lab_agents: Lab, make_guest: Callable[..., Guest], mn: ManagementServer, http: aiohttp.ClientSession
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(data_volumes=1, snapshots=1)
    await connect(http, src, mn)
    before = disk_sources(src, guest.name)

    def body(targets: dict[str, str], api: str) -> dict[str, Any]:
        return migrate_cmd(guest, src, dst, targets, api, policy="IncCopy")

    # Flat targets cannot take a top-only copy: refused before anything moves, the targets left alone.
    flat = {t: precreate(new_path(dst, "ps1"), virtual_size(p)) for t, p in before.items()}
    task_uuid = await send(http, src, "/vm/migrate", body(flat, "api-inc-bad"), mn)
    refused = (await mn.answer(task_uuid)).body
    assert refused["success"] is False and refused["error"].startswith("AGENT.TARGET_MISMATCH: "), refused
    assert "has no backing file" in refused["error"]
    assert guest.where() == {"hostA": "running"} and disk_sources(src, guest.name) == before
    assert all(os.path.exists(path) for path in flat.values())

    # The management server put the lower layers in place and made the tops on them: only the tops travel.
    tops: dict[str, str] = {}
    for target, path in before.items():
        lower = qemu_img_chain(path)[1]["filename"]
        base = str(dst.root("ps1").path / os.path.basename(lower))
        copy_sparse(lower, base)
        tops[target] = precreate(new_path(dst, "ps1"), virtual_size(path), backing=base)
    task_uuid = await send(http, src, "/vm/migrate", body(tops, "api-inc"), mn)
    assert (await mn.answer(task_uuid)).body == {"success": True, "error": None}
    assert guest.where() == {"hostB": "running"}
    assert disk_sources(dst, guest.name) == tops
    for top in tops.values():
        chain = qemu_img_chain(top)
        assert len(chain) == 2 and os.path.dirname(chain[1]["filename"]) == str(dst.root("ps1").path)
    guest.wait_for_acks(20)
    result = guest.verify()
    assert result.ok, result.output
