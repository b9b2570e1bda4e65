"""An agent restart on the same state directory: unfinished tasks are visible at once and handed back to the
engine factory with resume=True; a factory that refuses fails them with a clear error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from service_fakes import (
    AUTH,
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

from agent.api.app import make_app
from agent.errors import MigrationFailed

MIGRATE = "/v1/vms/{}/storage-migrations"


async def start(tmp_path: Path, factory: Any) -> Client:
    app = make_app(
        make_config(tmp_path), token=TOKEN, engine_factory=factory, inventory=FakeInventory(VM_1, VM_2)
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_unfinished_tasks_are_visible_and_resumed(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(tmp_path, FakeFactory(script))
    task = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    await eventually(lambda: script.started.is_set())

    async def copying() -> bool:  # the fake engine's step journalled (a fixed sleep lost it under load)
        view = await (await client.get(f"/v1/tasks/{task['taskUuid']}", headers=AUTH)).json()
        return bool(view["state"] == "COPYING" and view["progress"]["percent"] > 0)

    await eventually(copying)
    await client.close()
    assert script.cancelled == [True]

    script2 = Script(gate=asyncio.Event())
    client2 = await start(tmp_path, FakeFactory(script2))
    try:
        listed = await (await client2.get("/v1/tasks", headers=AUTH)).json()
        (view,) = listed["tasks"]
        assert view["taskUuid"] == task["taskUuid"] and view["state"] == "COPYING"
        assert view["progress"]["percent"] > 0  # the journalled floor survived
        await eventually(lambda: script2.calls == [(VM_1, True)])
        busy = await client2.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)
        assert busy.status == 409  # the resumed task still owns the VM
        script2.gate.set()  # type: ignore[union-attr]

        async def succeeded() -> bool:
            got = await (await client2.get(f"/v1/tasks/{task['taskUuid']}", headers=AUTH)).json()
            return bool(got["state"] == "SUCCEEDED")

        await eventually(succeeded)
    finally:
        await client2.close()


async def test_resume_refused_by_the_factory_fails_clearly(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(tmp_path, FakeFactory(script))
    task = await (await client.post(MIGRATE.format(VM_2), json=body(), headers=AUTH)).json()
    await eventually(lambda: script.started.is_set())
    await client.close()

    refusing = Script(factory_error=MigrationFailed("cannot resume this task", code="AGENT.NO_RESUME"))
    client2 = await start(tmp_path, FakeFactory(refusing))
    try:

        async def failed() -> bool:
            got = await (await client2.get(f"/v1/tasks/{task['taskUuid']}", headers=AUTH)).json()
            return bool(got["state"] == "FAILED" and got["error"]["code"] == "AGENT.NO_RESUME")

        await eventually(failed)
        assert refusing.calls == [(VM_2, True)]
    finally:
        await client2.close()
