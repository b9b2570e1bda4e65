"""``bandwidth: 0`` means uncapped (as in libvirt and ``virsh``) at every entry point: the API's POST and
PATCH, the ZStack dialect, and the CLI's ``migrate`` and ``retune``, each against the real app on loopback.
The engine sees None (no cap) for 0 exactly as for null; a negative value is refused naming the field."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cli_helpers import run_cli
from fake_agent_api import ThreadedServer
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
    body,
    eventually,
    make_config,
)
from test_zstack_api import (
    DST_HOST,
    DST_STORAGE,
    FakeManagementServer,
    answered,
    blk_body,
    dashed,
    migrate_body,
    qcow2,
    send,
    start_agent,
    view,
    zs_uuid,
)

from agent.api.app import make_app

MiB = 1024 * 1024
MIGRATE = "/v1/vms/{}/storage-migrations"


async def start(aiohttp_client: Any, tmp_path: Path, script: Script) -> Client:
    app = make_app(
        make_config(tmp_path),
        token=TOKEN,
        engine_factory=FakeFactory(script),
        inventory=FakeInventory(VM_1, VM_2),
    )
    client: Client = await aiohttp_client(app)
    return client


async def task_view(client: Client, task_uuid: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/tasks/{task_uuid}", headers=AUTH)
    assert resp.status == 200
    return dict(await resp.json())


async def until_state(client: Client, task_uuid: str, state: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal seen
        seen = await task_view(client, task_uuid)
        return seen["state"] == state

    await eventually(reached)
    return seen


async def error_of(resp: Any, field: str) -> dict[str, Any]:
    assert resp.status == 400, await resp.text()
    error: dict[str, Any] = await resp.json()
    assert error["code"] == "AGENT.INVALID_REQUEST" and error["field"] == field, error
    assert field in error["description"], error
    return error


# -- the API ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bandwidth", [0, None])
async def test_post_with_bandwidth_zero_or_null_runs_uncapped(
    aiohttp_client: Any, tmp_path: Path, bandwidth: int | None
) -> None:
    script = Script()
    client = await start(aiohttp_client, tmp_path, script)
    payload = body(migrateVm={"downTime": 300, "bandwidth": bandwidth})
    resp = await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)
    assert resp.status == 202, await resp.text()
    accepted = await resp.json()
    assert accepted["tuning"] == {"bandwidth": None, "downTime": 300}
    assert accepted["request"]["migrateVm"] == {"downTime": 300, "bandwidth": None}
    await until_state(client, accepted["taskUuid"], "SUCCEEDED")
    assert script.bandwidth_seen == [None]  # the engine's ctx.bandwidth: no cap, never a speed of 0


async def test_post_with_a_negative_bandwidth_is_400_naming_the_field(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    script = Script()
    client = await start(aiohttp_client, tmp_path, script)
    payload = body(migrateVm={"downTime": 300, "bandwidth": -1})
    error = await error_of(
        await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH), "migrateVm.bandwidth"
    )
    assert "greater than or equal to 0" in error["description"]
    assert script.calls == []


async def test_patch_bandwidth_zero_lifts_the_cap_of_a_running_task(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    script = Script(gate=asyncio.Event(), wait_tuning=True)
    client = await start(aiohttp_client, tmp_path, script)
    task = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    url = f"/v1/tasks/{task['taskUuid']}"
    await until_state(client, task["taskUuid"], "COPYING")
    assert script.bandwidth_seen == [100 * MiB]

    resp = await client.patch(url, json={"bandwidth": 0}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["tuning"] == {"bandwidth": None, "downTime": 300}
    error = await error_of(await client.patch(url, json={"bandwidth": -1}, headers=AUTH), "bandwidth")
    assert "greater than or equal to 0" in error["description"]
    # null or absent leaves the bandwidth as it is (now uncapped); downTime alone changes only downTime.
    resp = await client.patch(url, json={"bandwidth": None, "downTime": 900}, headers=AUTH)
    assert (await resp.json())["tuning"] == {"bandwidth": None, "downTime": 900}

    script.gate.set()  # type: ignore[union-attr]
    final = await until_state(client, task["taskUuid"], "SUCCEEDED")
    assert final["tuning"] == {"bandwidth": None, "downTime": 900}
    assert script.tuned == [(None, 900)]  # what the engine read after the retunes


async def test_patch_puts_a_cap_back_after_zero(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event(), wait_tuning=True)
    client = await start(aiohttp_client, tmp_path, script)
    payload = body(migrateVm={"bandwidth": 0})
    task = await (await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)).json()
    url = f"/v1/tasks/{task['taskUuid']}"
    await until_state(client, task["taskUuid"], "COPYING")
    resp = await client.patch(url, json={"bandwidth": 25}, headers=AUTH)
    assert (await resp.json())["tuning"]["bandwidth"] == 25
    script.gate.set()  # type: ignore[union-attr]
    await until_state(client, task["taskUuid"], "SUCCEEDED")
    assert script.bandwidth_seen == [None] and script.tuned == [(25 * MiB, 300)]


async def test_a_cap_lifted_by_zero_stays_lifted_across_a_restart(tmp_path: Path) -> None:
    def app(script: Script) -> web.Application:
        return make_app(
            make_config(tmp_path),
            token=TOKEN,
            engine_factory=FakeFactory(script),
            inventory=FakeInventory(VM_1),
        )

    script = Script(gate=asyncio.Event())
    client: Client = TestClient(TestServer(app(script)))
    await client.start_server()
    task = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    await until_state(client, task["taskUuid"], "COPYING")
    assert (
        await client.patch(f"/v1/tasks/{task['taskUuid']}", json={"bandwidth": 0}, headers=AUTH)
    ).status == 200
    await client.close()  # the agent stops; the task is journalled unfinished

    resumed = Script()
    client = TestClient(TestServer(app(resumed)))
    await client.start_server()
    try:
        final = await until_state(client, task["taskUuid"], "SUCCEEDED")
        assert final["tuning"]["bandwidth"] is None
        assert resumed.calls == [(VM_1, True)] and resumed.bandwidth_seen == [None]
    finally:
        await client.close()


# -- the ZStack dialect -------------------------------------------------------------------------------------


@pytest.fixture
async def mn(aiohttp_server: Any) -> FakeManagementServer:
    fake = FakeManagementServer()
    fake.server = await aiohttp_server(fake.app)
    return fake


@pytest.mark.parametrize("bandwidth", [0, None])
async def test_zstack_block_copy_with_bandwidth_zero_or_null_runs_uncapped(
    tmp_path: Path, mn: FakeManagementServer, bandwidth: int | None
) -> None:
    script = Script()
    client = await start_agent(tmp_path, script)
    try:
        target = qcow2(tmp_path / "rootA" / "new.qcow2")
        task_uuid = zs_uuid()
        command = blk_body(VM_1, "/old.qcow2", target, api="a", name="n")
        command["bandwidth"] = bandwidth
        await send(client, "/vm/blklivemigration", command, task_uuid, mn)
        assert (await answered(mn, task_uuid)).body == {"success": True, "error": None}
        task = await view(client, dashed(task_uuid))
        assert task["request"]["migrateVm"]["bandwidth"] is None
        assert task["tuning"]["bandwidth"] is None
        assert script.bandwidth_seen == [None]
    finally:
        await client.close()


async def test_zstack_migrate_with_bandwidth_zero_runs_uncapped(
    tmp_path: Path, mn: FakeManagementServer, aiohttp_server: Any
) -> None:
    async def host(request: web.Request) -> web.Response:
        storage = [{"uuid": DST_STORAGE, "path": "/var/lib/ksa-lab/hostB/storage/ps1"}]
        return web.json_response({"hostUuid": DST_HOST, "storage": storage})

    destination = web.Application()
    destination.router.add_get("/v1/incoming-migrations", host)
    dst_server: TestServer = await aiohttp_server(destination)
    script = Script()
    client = await start_agent(tmp_path, script, port=dst_server.port)
    try:
        task_uuid = zs_uuid()
        disks = {
            "/var/lib/ksa-lab/hostA/storage/ps1/root.qcow2": "/var/lib/ksa-lab/hostB/storage/ps1/r2.qcow2"
        }
        command = migrate_body(VM_2, disks, api="api-mig", name=task_uuid)
        command["bandwidth"] = 0
        await send(client, "/vm/migrate", command, task_uuid, mn)
        assert (await answered(mn, task_uuid)).body == {"success": True, "error": None}
        task = await view(client, dashed(task_uuid))
        assert task["request"]["migrateVm"] == {"downTime": 500, "bandwidth": None}
        assert script.bandwidth_seen == [None]
    finally:
        await client.close()


@pytest.mark.parametrize("path", ["/vm/blklivemigration", "/vm/migrate"])
async def test_zstack_negative_bandwidth_is_refused_naming_the_field(
    tmp_path: Path, mn: FakeManagementServer, path: str
) -> None:
    script = Script()
    client = await start_agent(tmp_path, script)
    try:
        task_uuid = zs_uuid()
        if path == "/vm/migrate":
            command = migrate_body(VM_2, {"/a.qcow2": "/b.qcow2"}, api="a", name="n")
        else:
            command = blk_body(VM_1, "/old.qcow2", str(tmp_path / "rootA" / "new.qcow2"), api="a", name="n")
        command["bandwidth"] = -1
        await send(client, path, command, task_uuid, mn)
        answer = (await answered(mn, task_uuid)).body
        assert answer["success"] is False
        assert answer["error"].startswith("AGENT.INVALID_REQUEST: bandwidth: "), answer
        assert script.calls == []
    finally:
        await client.close()


# -- the CLI (in-process; the real app runs in a thread, since the CLI owns its event loop) ------------------


@pytest.fixture
def script() -> Script:
    return Script(gate=asyncio.Event(), wait_tuning=True)


@pytest.fixture
def agent(tmp_path: Path, script: Script) -> Iterator[ThreadedServer]:
    app = make_app(
        make_config(tmp_path), token=TOKEN, engine_factory=FakeFactory(script), inventory=FakeInventory(VM_1)
    )
    server = ThreadedServer(app)
    server.start()
    try:
        yield server
    finally:
        # Let a task still held at the gate finish, so the app stops without cancelling it.
        server._loop.call_soon_threadsafe(script.gate.set)  # type: ignore[union-attr]
        server.stop()


def test_cli_bandwidth_zero_migrates_uncapped_and_retune_zero_lifts_a_cap(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, agent: ThreadedServer, script: Script
) -> None:
    reach = ("--agent", agent.url, "--token-file", str(tmp_path / "token"))

    def show(task_uuid: str) -> dict[str, Any]:
        result = run_cli(capsys, "show", task_uuid, *reach, "--json")
        assert result.code == 0, result.err
        shown: dict[str, Any] = json.loads(result.out)
        return shown

    started = run_cli(
        capsys, "migrate", VM_1, *reach, "--dst-storage", STORAGE_A, "--bandwidth", "30", "--json"
    )
    assert started.code == 0, started.err
    task_uuid = json.loads(started.out)["taskUuid"]
    assert show(task_uuid)["tuning"]["bandwidth"] == 30

    retuned = run_cli(capsys, "retune", task_uuid, *reach, "--bandwidth", "0")
    assert retuned.code == 0, retuned.err
    assert retuned.out.endswith("(bandwidth uncapped)\n"), retuned.out
    assert show(task_uuid)["tuning"] == {"bandwidth": None, "downTime": 300}
    refused = run_cli(capsys, "retune", task_uuid, *reach, "--bandwidth", "-1")
    assert refused.code == 2 and "must be at least 0 (0: uncapped)" in refused.err

    agent._loop.call_soon_threadsafe(script.gate.set)  # type: ignore[union-attr]
    finished = run_cli(capsys, "watch", task_uuid, *reach, "--json")
    assert finished.code == 0, finished.err
    assert script.bandwidth_seen == [30 * MiB] and script.tuned == [(None, 300)]
    script.wait_tuning = False  # the next task runs straight through

    again = run_cli(capsys, "migrate", VM_1, *reach, "--dst-storage", STORAGE_A, "--bandwidth", "0", "--json")
    assert again.code == 0, again.err
    second = json.loads(again.out)
    assert second["tuning"]["bandwidth"] is None
    assert second["request"]["migrateVm"]["bandwidth"] is None
    finished = run_cli(capsys, "watch", second["taskUuid"], *reach, "--json")
    assert finished.code == 0, finished.err
    assert script.bandwidth_seen == [30 * MiB, None]

    refused = run_cli(capsys, "migrate", VM_1, *reach, "--dst-storage", STORAGE_A, "--bandwidth", "-5")
    assert refused.code == 2 and "must be at least 0 (0: uncapped)" in refused.err
