"""The client and the CLI's request body against the agent's real app (``agent.api.app``) on loopback.

The other client tests use a fake of the API; this one catches drift between that fake and the agent: the
same calls must work against the real routes, validation, auth, task manager and event stream. Only the
migration engine and the VM inventory are stand-ins (no libvirt in unit tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from agent.api.app import make_app
from agent.cli.body import migration_body
from agent.cli.parser import build_parser
from agent.client import AgentClient, ApiError, TaskView, follow_task
from agent.config import parse_config
from agent.errors import NotFound
from agent.migration.engine import Engine, TaskContext
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState

ServerFactory = Callable[..., Awaitable[TestServer]]
TOKEN = "contract-token"
HOST = "6f1b7c1e-6a52-4e8e-9a8e-3c0d2b1f0a11"
STORAGE = "0b0f1c3a-1111-4a4a-8b8b-000000000001"
VM = "11111111-2222-4333-8444-555555555501"
NEW_PATH = "/new/root.qcow2"


class GatedEngine:
    """Copies in steps; waits for ``gate`` halfway so tests can retune or cancel a running task."""

    name = "contract"

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        await ctx.enter(TaskState.PREPARING)
        await ctx.enter(TaskState.COPYING, "copying vda")
        for step in range(1, 5):
            ctx.progress("vol-root", step * 256, 1024)
            await asyncio.sleep(0.02)
            if step == 2:
                self.gate.halfway.set()
                await self.gate.open.wait()
        await ctx.enter(TaskState.SWITCHING)
        ctx.note("downtimeMs", 17)
        return [{"uuid": "vol-root", "deviceName": "vda", "type": "Root", "installPath": NEW_PATH}]


class Gate:
    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.halfway = asyncio.Event()


class OneVm:
    async def list_vms(self) -> list[dict[str, Any]]:
        return [{"uuid": VM, "name": "guest", "state": "running", "persistent": True}]

    async def describe_vm(self, vm_uuid: str) -> dict[str, Any]:
        if vm_uuid != VM:
            raise NotFound(f"no VM {vm_uuid}", field="vmUuid")
        return {"uuid": VM, "name": "guest", "state": "running", "disks": []}


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def client(tmp_path: Path, gate: Gate, aiohttp_server: ServerFactory) -> AsyncIterator[AgentClient]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    (tmp_path / "root").mkdir()
    config = parse_config(
        {
            "listen_address": "127.0.0.1",
            "token_file": str(token_file),
            "host_uuid": HOST,
            "state_dir": str(tmp_path / "state"),
            "shutdown_grace_s": 1.0,
            "storage": [{"uuid": STORAGE, "path": str(tmp_path / "root")}],
        }
    )

    def factory(request: MigrationRequest, vm_uuid: str, resume: bool) -> Engine:
        return GatedEngine(gate)

    server = await aiohttp_server(make_app(config, token=TOKEN, engine_factory=factory, inventory=OneVm()))
    async with AgentClient(str(server.make_url("/")), TOKEN) as agent:
        yield agent


def cli_body(*options: str) -> dict[str, Any]:
    args = build_parser({}).parse_args(
        ["migrate", VM, "--agent", "http://x", "--dst-storage", STORAGE, *options]
    )
    return migration_body(args)


async def follow(client: AgentClient, task_uuid: str) -> list[TaskView]:
    return [task async for task in follow_task(client, task_uuid, poll_interval=0.05)]


async def test_health_host_and_vms(client: AgentClient) -> None:
    assert (await client.health())["status"] == "ok"
    assert (await client.host())["storage"][0]["uuid"] == STORAGE
    assert [vm["uuid"] for vm in await client.list_vms()] == [VM]
    assert (await client.vm(VM))["name"] == "guest"


async def test_the_token_is_checked(client: AgentClient) -> None:
    async with AgentClient(client.base_url, "wrong") as intruder:
        assert (await intruder.health())["status"] == "ok"
        with pytest.raises(ApiError) as caught:
            await intruder.tasks()
    assert caught.value.status == 401


async def test_a_cli_body_runs_to_success_over_the_event_stream(client: AgentClient) -> None:
    task = await client.start_migration(
        VM, cli_body("--with-data-volumes", "--bandwidth", "50", "--downtime", "200")
    )
    snapshots = await follow(client, task["taskUuid"])
    final = snapshots[-1]
    assert final["state"] == "SUCCEEDED"
    assert final["downtimeMs"] == 17
    assert final["inventory"]["volumes"][0]["installPath"] == NEW_PATH
    percents = [t["progress"]["percent"] for t in snapshots]
    assert percents == sorted(percents)
    assert percents[-1] == 100.0
    assert [t["taskUuid"] for t in await client.tasks(state="SUCCEEDED", vm_uuid=VM)] == [task["taskUuid"]]


async def test_the_same_task_uuid_gives_the_same_task(client: AgentClient) -> None:
    body = cli_body("--task-uuid", "6e5d4c3b-2a19-4807-b6a5-9483726150ab")
    first = await client.start_migration(VM, body)
    again = await client.start_migration(VM, body)
    assert first["taskUuid"] == again["taskUuid"] == "6e5d4c3b-2a19-4807-b6a5-9483726150ab"


async def test_refusals_carry_the_error_code(client: AgentClient) -> None:
    with pytest.raises(ApiError) as unknown_storage:
        await client.start_migration(VM, {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": HOST}})
    assert unknown_storage.value.status == 400
    assert "dstPrimaryStorageUuid" in (unknown_storage.value.field or "")
    with pytest.raises(ApiError) as unknown_vm:
        await client.start_migration(HOST, cli_body())
    assert unknown_vm.value.status == 404
    with pytest.raises(ApiError) as unknown_task:
        _ = [event async for event in client.events(HOST)]
    assert unknown_task.value.status == 404


async def test_retune_and_cancel_a_running_task(client: AgentClient, gate: Gate) -> None:
    gate.open.clear()
    task = await client.start_migration(VM, cli_body())
    task_uuid = task["taskUuid"]
    async with asyncio.timeout(5):
        await gate.halfway.wait()
    retuned = await client.patch_task(task_uuid, bandwidth=20, downtime=150)
    assert retuned["tuning"] == {"bandwidth": 20, "downTime": 150}
    with pytest.raises(ApiError) as busy:
        await client.start_migration(VM, cli_body())
    assert busy.value.status == 409
    await client.cancel(task_uuid)
    await client.cancel(task_uuid)  # idempotent
    assert (await follow(client, task_uuid))[-1]["state"] == "CANCELLED"
