"""The ZStack dialect on loopback: a fake management server (a real aiohttp server that records callbacks and
progress reports) drives the real app with a fake engine, using command bodies built from ZStack's field
lists. Callback bodies and headers are checked exactly, failures included."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from service_fakes import (
    AUTH,
    STORAGE_A,
    TOKEN,
    VM_1,
    VM_2,
    Client,
    FakeFactory,
    FakeInventory,
    Script,
    eventually,
    make_config,
)

from agent.api.app import make_app
from agent.config import parse_config
from agent.errors import MigrationFailed
from agent.zstack import mount
from labkit import agentctl
from labkit.layout import BRIDGE_ADDRESS, HOSTS
from labkit.state import LabState

MiB = 1024 * 1024
ZS_HOST = "3c1a6f0b2c8e4d3f9b7a5e1d0c2b4a69"  # ZStack's uuid for this host (32 hex)
DST_HOST = "7a75e417-1c98-4fff-88e7-182bf2cf97f7"
DST_STORAGE = "775ffc79-9e01-4016-b40e-d20d58261948"
NO_MATCH = {"success": False, "error": "no matched job to cancel"}


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class FakeManagementServer:
    """ZStack's side: the async callback endpoint and the command endpoint progress reports go to."""

    CALLBACK = "/zstack/asyncrest/callback"
    COMMAND = "/zstack/kvm/command"

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.refuse = 0  # answer 500 to this many callbacks first
        self.app = web.Application()
        self.app.router.add_post(self.CALLBACK, self._handle)
        self.app.router.add_post(self.COMMAND, self._handle)
        self.server: TestServer | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.calls.append(Call(request.path, dict(request.headers), json.loads(raw), time.monotonic()))
        if request.path == self.CALLBACK and self.refuse > 0:
            self.refuse -= 1
            return web.Response(status=500)
        return web.Response(status=200)

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def callbacks(self, task_uuid: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.path == self.CALLBACK and (task_uuid is None or c.headers.get("taskuuid") == task_uuid)
        ]

    def progress(self, task_uuid: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.path == self.COMMAND
            and (task_uuid is None or c.body["threadContextMap"].get("task-name") == task_uuid)
        ]


@pytest.fixture
async def mn(aiohttp_server: Any) -> FakeManagementServer:
    fake = FakeManagementServer()
    fake.server = await aiohttp_server(fake.app)
    return fake


# -- command bodies, from ZStack's field lists --------------------------------------------------------------


def zs_uuid() -> str:
    return uuid.uuid4().hex


def common(api: str, task_name: str, *, stage: str = "10-90", left_s: float = 3600) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    return {
        "threadContext": {"api": api, "task-name": task_name, "task-stage": stage},
        "threadContextStack": [],
        "taskContext": {
            "__messagetimeout__": str(int(left_s * 1000)),
            "__messagedeadline__": str(now_ms + int(left_s * 1000)),
        },
        "kvmHostAddons": {"qcow2Options": " -o cluster_size=2097152 "},
    }


def volume_to(path: str, volume_uuid: str, kind: str = "Data") -> dict[str, Any]:
    return {
        "installPath": path,
        "deviceId": 1,
        "deviceType": "file",
        "volumeUuid": volume_uuid,
        "useVirtio": True,
        "useVirtioSCSI": False,
        "shareable": False,
        "cacheMode": "none",
        "wwn": "0x5000c29c1a2b3c4d",
        "bootOrder": 0,
        "physicalBlockSize": 0,
        "type": kind,
        "format": "qcow2",
        "primaryStorageType": "LocalStorage",
    }


def blk_body(
    vm: str, old: str, new: str, *, api: str, name: str, reload: bool = False, **kw: Any
) -> dict[str, Any]:
    return {
        "vmUuid": vm.replace("-", ""),
        "oldVolumePath": old,
        "newVolume": volume_to(new, zs_uuid()),
        "bandwidth": 100,
        "reload": reload,
        **common(api, name, **kw),
    }


def migrate_body(
    vm: str, disks: dict[str, str], *, api: str, name: str, policy: str = "FullCopy"
) -> dict[str, Any]:
    return {
        "vmUuid": vm.replace("-", ""),
        "destHostIp": "127.0.0.1",
        "destHostManagementIp": "127.0.0.1",
        "srcHostIp": "127.0.0.1",
        "storageMigrationPolicy": policy,
        "disks": {
            old: volume_to(new, zs_uuid(), "Root" if i == 0 else "Data")
            for i, (old, new) in enumerate(disks.items())
        },
        "bandwidth": 50,
        "downTime": 500,
        "autoConverge": True,
        "xbzrle": False,
        "reload": False,
        "useNuma": False,
        "migrateFromDestination": False,
        "nics": [],
        "vdpaPaths": [],
        "timeout": 1800,
        **common(api, name),
    }


def qcow2(path: Path, size: int = 64 * MiB) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return str(path)


# -- the agent --------------------------------------------------------------------------------------------


async def start_agent(tmp_path: Path, script: Script | None = None, **config: Any) -> Client:
    zstack = config.pop("zstack", {"enabled": True, "allowed_networks": ["127.0.0.0/8", "::1/128"]})
    app = make_app(
        make_config(tmp_path, zstack=zstack, **config),
        token=TOKEN,
        engine_factory=FakeFactory(script or Script()),
        inventory=FakeInventory(VM_1, VM_2),
        dialects=(mount,),
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def connect(client: Client, mn: FakeManagementServer) -> dict[str, Any]:
    resp = await client.post(
        "/host/connect",
        json={"hostUuid": ZS_HOST, "sendCommandUrl": mn.url(mn.COMMAND), **common("api-connect", "connect")},
    )
    assert resp.status == 200
    return dict(await resp.json())


async def send(
    client: Client, path: str, body: dict[str, Any], task_uuid: str, mn: FakeManagementServer
) -> None:
    resp = await client.post(
        path, json=body, headers={"taskuuid": task_uuid, "callbackurl": mn.url(mn.CALLBACK)}
    )
    assert resp.status == 200, await resp.text()
    assert await resp.read() == b""  # ZStack's async calls: 200, empty body, answer later


async def answered(mn: FakeManagementServer, task_uuid: str, within: float = 10.0) -> Call:
    await eventually(lambda: len(mn.callbacks(task_uuid)) >= 1, within=within)
    return mn.callbacks(task_uuid)[0]


def dashed(zs: str) -> str:
    return str(uuid.UUID(zs))


async def view(client: Client, task_uuid: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/tasks/{task_uuid}", headers=AUTH)
    assert resp.status == 200
    return dict(await resp.json())


# -- tests ------------------------------------------------------------------------------------------------


async def test_block_live_migration_answers_and_reports_progress(
    tmp_path: Path, mn: FakeManagementServer
) -> None:
    client = await start_agent(tmp_path, Script(steps=30, step_s=0.02))
    try:
        assert (await connect(client, mn)) == {
            "success": True,
            "error": None,
            "libvirtVersion": None,
            "qemuVersion": None,
        }
        target = qcow2(tmp_path / "rootA" / "new-data.qcow2")
        task_uuid = zs_uuid()
        body = blk_body(VM_1, "/old/data.qcow2", target, api="api-blk-1", name=task_uuid)
        await send(client, "/vm/blklivemigration", body, task_uuid, mn)
        call = await answered(mn, task_uuid)
        assert call.body == {"success": True, "error": None}
        assert call.headers["taskuuid"] == task_uuid  # verbatim: 32 hex, as ZStack sent it
        assert "Authorization" not in call.headers

        task = await view(client, dashed(task_uuid))
        assert task["state"] == "SUCCEEDED"
        request = task["request"]
        assert request["targetsPrecreated"] is True
        assert request["primaryStorageMigrateVm"]["dstPrimaryStorageUuid"] == STORAGE_A
        assert request["primaryStorageMigrateVm"]["withSnapshots"] is False  # a flat target: full copy
        assert request["volumes"] == [
            {
                "uuid": body["newVolume"]["volumeUuid"],
                "installPath": "/old/data.qcow2",
                "dstInstallPath": target,
            }
        ]
        assert request["migrateVm"]["bandwidth"] == 100
        assert 3000 < request["timeout"] <= 3600

        await eventually(
            lambda: mn.progress(task_uuid) and mn.progress(task_uuid)[-1].body["progress"] == "90"
        )
        reports = mn.progress(task_uuid)
        assert len(reports) >= 2
        for report in reports:
            assert report.headers["commandpath"] == "/progress/report"
            assert "taskuuid" not in report.headers
            assert set(report.body) == {
                "progress",
                "processType",
                "serverUuid",
                "detail",
                "threadContextMap",
                "threadContextStack",
            }
            assert report.body["processType"] == "blockCopy"
            assert report.body["serverUuid"] == ZS_HOST
            assert report.body["threadContextMap"] == body["threadContext"]
            assert report.body["threadContextStack"] == []
            assert set(report.body["detail"]) == {"remain", "total", "speed", "remaining_migration_time"}
        percents = [int(r.body["progress"]) for r in reports]
        assert percents == sorted(percents) and all(10 <= p <= 90 for p in percents)
        assert max(percents[:-1]) <= 89  # 99 % of the 10-90 stage until done
        last = reports[-1].body["detail"]
        assert last["remain"] == 0 and last["total"] == 2500
    finally:
        await client.close()


async def test_failure_answers_success_false_with_the_message(
    tmp_path: Path, mn: FakeManagementServer
) -> None:
    script = Script(
        fail=MigrationFailed("the mirror of vdb failed", code="AGENT.BLOCK_JOB_FAILED", details="see log")
    )
    client = await start_agent(tmp_path, script)
    try:
        target = qcow2(tmp_path / "rootA" / "new.qcow2")
        task_uuid = zs_uuid()
        await send(
            client,
            "/vm/blklivemigration",
            blk_body(VM_1, "/old.qcow2", target, api="a", name="n"),
            task_uuid,
            mn,
        )
        call = await answered(mn, task_uuid)
        assert call.body == {
            "success": False,
            "error": "AGENT.BLOCK_JOB_FAILED: the mirror of vdb failed; see log",
        }
        assert call.headers["taskuuid"] == task_uuid
    finally:
        await client.close()


@pytest.mark.parametrize("left_s", [30, 60])
async def test_sixty_seconds_or_less_is_refused(
    tmp_path: Path, mn: FakeManagementServer, left_s: float
) -> None:
    script = Script()
    client = await start_agent(tmp_path, script)
    try:
        target = qcow2(tmp_path / "rootA" / "new.qcow2")
        task_uuid = zs_uuid()
        body = blk_body(VM_1, "/old.qcow2", target, api="a", name="n", left_s=left_s)
        await send(client, "/vm/blklivemigration", body, task_uuid, mn)
        call = await answered(mn, task_uuid)
        assert call.body["success"] is False
        assert call.body["error"] in (
            f"timeout[{left_s}] is too short",
            f"timeout[{left_s - 1}] is too short",
        )
        assert script.calls == []  # no task, no engine
        assert (await client.get(f"/v1/tasks/{dashed(task_uuid)}", headers=AUTH)).status == 404
    finally:
        await client.close()


async def test_bad_commands_are_answered_at_the_callback(tmp_path: Path, mn: FakeManagementServer) -> None:
    client = await start_agent(tmp_path)
    try:
        missing = zs_uuid()  # the management server pre-creates the target; this one is not there
        body = blk_body(VM_1, "/old.qcow2", str(tmp_path / "rootA" / "none.qcow2"), api="a", name="n")
        await send(client, "/vm/blklivemigration", body, missing, mn)
        assert (await answered(mn, missing)).body["error"].startswith("AGENT.TARGET_MISMATCH: ")

        outside = zs_uuid()
        await send(
            client,
            "/vm/blklivemigration",
            blk_body(VM_1, "/o", "/etc/x.qcow2", api="a", name="n"),
            outside,
            mn,
        )
        error = (await answered(mn, outside)).body["error"]
        assert "not inside a primary storage of this host" in error

        garbled = zs_uuid()
        await send(client, "/vm/blklivemigration", {"vmUuid": VM_1}, garbled, mn)
        assert (await answered(mn, garbled)).body["error"].startswith("AGENT.INVALID_REQUEST: ")

        unknown_vm = zs_uuid()
        target = qcow2(tmp_path / "rootA" / "t.qcow2")
        await send(
            client,
            "/vm/blklivemigration",
            blk_body(uuid.uuid4().hex, "/o", target, api="a", name="n"),
            unknown_vm,
            mn,
        )
        assert (await answered(mn, unknown_vm)).body["error"].startswith("AGENT.NOT_FOUND: ")

        resp = await client.post("/vm/blklivemigration", json={})  # no taskuuid: ZStack's own 400
        assert resp.status == 400 and "taskUuid missing" in await resp.text()
    finally:
        await client.close()


async def test_duplicate_taskuuid_is_ignored(tmp_path: Path, mn: FakeManagementServer) -> None:
    gate = asyncio.Event()
    script = Script(gate=gate)
    client = await start_agent(tmp_path, script)
    try:
        target = qcow2(tmp_path / "rootA" / "new.qcow2")
        task_uuid = zs_uuid()
        body = blk_body(VM_1, "/old.qcow2", target, api="a", name="n")
        await send(client, "/vm/blklivemigration", body, task_uuid, mn)
        await eventually(lambda: script.started.is_set())
        await send(client, "/vm/blklivemigration", body, task_uuid, mn)
        gate.set()
        await answered(mn, task_uuid)
        await asyncio.sleep(0.5)
        assert len(mn.callbacks(task_uuid)) == 1 and len(script.calls) == 1
    finally:
        await client.close()


async def test_callback_is_retried_until_the_management_server_takes_it(
    tmp_path: Path, mn: FakeManagementServer
) -> None:
    mn.refuse = 3
    client = await start_agent(tmp_path)
    try:
        target = qcow2(tmp_path / "rootA" / "new.qcow2")
        task_uuid = zs_uuid()
        await send(
            client,
            "/vm/blklivemigration",
            blk_body(VM_1, "/o.qcow2", target, api="a", name="n"),
            task_uuid,
            mn,
        )
        await eventually(lambda: len(mn.callbacks(task_uuid)) == 4)
        assert all(c.body == {"success": True, "error": None} for c in mn.callbacks(task_uuid))
        await asyncio.sleep(0.3)
        assert len(mn.callbacks(task_uuid)) == 4
    finally:
        await client.close()


async def test_migrate_to_another_host_with_precreated_targets(
    tmp_path: Path, mn: FakeManagementServer, aiohttp_server: Any
) -> None:
    asked: list[str] = []

    async def host(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Authorization", ""))
        return web.json_response(
            {
                "hostUuid": DST_HOST,
                "storage": [{"uuid": DST_STORAGE, "path": "/var/lib/ksa-lab/hostB/storage/ps1"}],
            }
        )

    destination = web.Application()
    destination.router.add_get("/v1/incoming-migrations", host)  # a peer's call: no management route
    dst_server: TestServer = await aiohttp_server(destination)
    (tmp_path / "cluster-token").write_text("the-cluster-token\n")
    client = await start_agent(
        tmp_path, port=dst_server.port, cluster_token_file=str(tmp_path / "cluster-token")
    )
    try:
        task_uuid = zs_uuid()
        disks = {
            "/var/lib/ksa-lab/hostA/storage/ps1/root.qcow2": "/var/lib/ksa-lab/hostB/storage/ps1/r2.qcow2",
            "/var/lib/ksa-lab/hostA/storage/ps1/data.qcow2": "/var/lib/ksa-lab/hostB/storage/ps1/d2.qcow2",
        }
        body = migrate_body(VM_2, disks, api="api-mig", name=task_uuid, policy="IncCopy")
        await send(client, "/vm/migrate", body, task_uuid, mn)
        assert (await answered(mn, task_uuid)).body == {"success": True, "error": None}
        assert asked == ["Bearer the-cluster-token"]  # never this agent's own management token
        request = (await view(client, dashed(task_uuid)))["request"]
        assert request["primaryStorageMigrateVm"] == {
            "dstPrimaryStorageUuid": DST_STORAGE,
            "withDataVolumes": True,
            "withSnapshots": True,  # IncCopy: only the tops travel, onto chains already in place
            "dstHostUuid": DST_HOST,
            "strategy": "auto-converge",
        }
        assert request["dstHost"] == {
            "uuid": DST_HOST,
            "agentUrl": f"http://127.0.0.1:{dst_server.port}",
            "migrationAddress": "127.0.0.1",
        }
        assert request["migrateVm"] == {"downTime": 500, "bandwidth": 50}
        assert request["targetsPrecreated"] is True and 1700 < request["timeout"] <= 1790
        assert {(v["installPath"], v["dstInstallPath"]) for v in request["volumes"]} == set(disks.items())

        elsewhere = zs_uuid()
        body = migrate_body(VM_2, {"/a.qcow2": "/srv/other/a.qcow2"}, api="x", name="y")
        await send(client, "/vm/migrate", body, elsewhere, mn)
        assert (
            "not inside a primary storage of the destination host"
            in (await answered(mn, elsewhere)).body["error"]
        )
    finally:
        await client.close()


async def test_job_cancel_by_api_id(tmp_path: Path, mn: FakeManagementServer) -> None:
    gate = asyncio.Event()
    script = Script(gate=gate)
    client = await start_agent(tmp_path, script)
    try:
        target = qcow2(tmp_path / "rootA" / "new.qcow2")
        task_uuid = zs_uuid()
        await send(
            client,
            "/vm/blklivemigration",
            blk_body(VM_1, "/o.qcow2", target, api="api-7", name="n"),
            task_uuid,
            mn,
        )
        await eventually(lambda: script.started.is_set())

        resp = await client.post(
            "/job/cancel", json={"cancellationApiId": "api-other", **common("api-c", "cancel")}
        )
        assert await resp.json() == NO_MATCH

        cancel_uuid = zs_uuid()
        cancel = {"cancellationApiId": "api-7", "times": 1, "interval": 1, **common("api-c", "cancel")}
        await send(client, "/job/cancel", cancel, cancel_uuid, mn)
        assert (await answered(mn, cancel_uuid)).body == {"success": True, "error": None}
        call = await answered(mn, task_uuid)
        assert call.body == {
            "success": False,
            "error": "AGENT.CANCELLED: the migration was cancelled on request; "
            "the VM keeps its source volumes",
        }
        assert (await view(client, dashed(task_uuid)))["state"] == "CANCELLED"
        again = await client.post("/job/cancel", json={"cancellationApiId": "api-7"})
        assert await again.json() == NO_MATCH  # nothing runs under that api any more
    finally:
        await client.close()


async def test_reload_after_a_restart_reports_the_real_outcome(
    tmp_path: Path, mn: FakeManagementServer
) -> None:
    first = Script(gate=asyncio.Event())
    client = await start_agent(tmp_path, first)
    target = qcow2(tmp_path / "rootA" / "new.qcow2")
    task_uuid = zs_uuid()
    body = blk_body(VM_1, "/o.qcow2", target, api="api-r", name="n")
    await connect(client, mn)
    await send(client, "/vm/blklivemigration", body, task_uuid, mn)
    await eventually(lambda: first.started.is_set())
    await client.close()  # the agent stops: the task is detached, unfinished in the journal
    assert first.cancelled == [True] and mn.callbacks() == []

    second = Script(gate=asyncio.Event())
    client = await start_agent(tmp_path, second)
    try:
        await eventually(lambda: second.calls == [(VM_1, True)])  # resumed from the journal
        reload_uuid = zs_uuid()
        await send(
            client,
            "/vm/blklivemigration",
            blk_body(VM_1, "/o.qcow2", target, api="api-r2", name="n", reload=True),
            reload_uuid,
            mn,
        )
        await asyncio.sleep(0.3)
        assert mn.callbacks() == []  # still running: the answer waits for the real end
        second.gate.set()  # type: ignore[union-attr]
        assert (await answered(mn, reload_uuid)).body == {"success": True, "error": None}
        assert (await answered(mn, task_uuid)).body == {"success": True, "error": None}  # the original too
        assert second.calls == [(VM_1, True)]  # the reload started nothing new
        assert mn.progress()[-1].body["serverUuid"] == ZS_HOST  # the connection survived the restart
    finally:
        await client.close()


async def test_reload_of_an_ended_job_reports_its_failure(tmp_path: Path, mn: FakeManagementServer) -> None:
    script = Script(fail=MigrationFailed("no space", code="AGENT.NO_SPACE"))
    client = await start_agent(tmp_path, script)
    try:
        target = qcow2(tmp_path / "rootA" / "new.qcow2")
        first = zs_uuid()
        await send(
            client, "/vm/blklivemigration", blk_body(VM_1, "/o.qcow2", target, api="a", name="n"), first, mn
        )
        failure = (await answered(mn, first)).body
        assert failure == {"success": False, "error": "AGENT.NO_SPACE: no space"}
        reload_uuid = zs_uuid()
        body = blk_body(VM_1, "/o.qcow2", target, api="b", name="n", reload=True)
        await send(client, "/vm/blklivemigration", body, reload_uuid, mn)
        assert (await answered(mn, reload_uuid)).body == failure
        assert len(script.calls) == 1
        await send(client, "/vm/blklivemigration", body, reload_uuid, mn)  # asked again, same taskuuid
        await eventually(lambda: len(mn.callbacks(reload_uuid)) == 2)
    finally:
        await client.close()


async def test_host_commands(tmp_path: Path, mn: FakeManagementServer) -> None:
    client = await start_agent(tmp_path)
    try:
        ping = await client.post("/host/ping", json={"hostUuid": ZS_HOST, **common("p", "ping")})
        assert await ping.json() == {
            "success": True,
            "error": None,
            "hostUuid": None,  # not connected yet: ZStack reconnects
            "sendCommandUrl": None,
            "version": "0.1.0",
        }
        refused = await client.post(
            "/host/connect", json={"hostUuid": ZS_HOST}, headers={"taskuuid": zs_uuid()}
        )
        assert refused.status == 400
        await connect(client, mn)
        ping_uuid = zs_uuid()
        await send(client, "/host/ping", {"hostUuid": ZS_HOST}, ping_uuid, mn)
        assert (await answered(mn, ping_uuid)).body == {
            "success": True,
            "error": None,
            "hostUuid": ZS_HOST,
            "sendCommandUrl": mn.url(mn.COMMAND),
            "version": "0.1.0",
        }
        echo = await client.post(
            "/host/echo/", data=b""
        )  # ZStack registers the paths with a trailing slash too
        assert echo.status == 200 and await echo.read() == b""
    finally:
        await client.close()


async def test_only_allowed_networks_and_only_when_enabled(tmp_path: Path) -> None:
    for name in "abc":
        (tmp_path / name).mkdir()
    client = await start_agent(
        tmp_path / "a", zstack={"enabled": True, "allowed_networks": ["10.213.0.0/24"]}
    )
    try:
        resp = await client.post("/host/echo")
        assert resp.status == 403
        assert (await client.get("/v1/tasks")).status == 401  # the agent's own API still needs the token
    finally:
        await client.close()
    client = await start_agent(tmp_path / "b", zstack={"enabled": True})  # no networks: nobody
    try:
        assert (await client.post("/host/echo")).status == 403
    finally:
        await client.close()
    client = await start_agent(tmp_path / "c", zstack={})  # off by default
    try:
        assert (await client.post("/host/echo")).status == 401
        assert (await client.post("/host/echo", headers=AUTH)).status == 404
    finally:
        await client.close()


def test_the_lab_turns_the_dialect_on_for_its_networks() -> None:
    state = LabState.fresh()
    for host in HOSTS:
        config = parse_config(
            tomllib.loads(agentctl.config_text(host, state.hosts[host.name], state.ceph)), host.name
        )
        assert config.zstack.enabled
        assert config.zstack.allowed_networks == (
            ipaddress.ip_network(f"{BRIDGE_ADDRESS}/24", strict=False),  # the lab instance's own subnet
            ipaddress.ip_network("127.0.0.0/8"),
        )


async def test_a_command_cut_short_by_a_restart_is_answered_at_the_next_start(
    tmp_path: Path, mn: FakeManagementServer
) -> None:
    task_uuid = zs_uuid()
    commands = tmp_path / "state" / "zstack" / "commands"
    commands.mkdir(parents=True)
    record = {
        "task_uuid": task_uuid,
        "kind": "blockCopy",
        "callback_url": mn.url(mn.CALLBACK),
        "created_at": time.time(),
        "vm_uuid": VM_1,
    }
    (commands / f"{task_uuid}.json").write_text(json.dumps(record))
    client = await start_agent(tmp_path)
    try:
        call = await answered(mn, task_uuid)
        assert call.body == {
            "success": False,
            "error": "the agent restarted before this command became a task; nothing was started",
        }
        assert call.headers["taskuuid"] == task_uuid
    finally:
        await client.close()
