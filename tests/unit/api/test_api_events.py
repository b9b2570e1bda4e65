"""Server-sent events: every change as a full view, percent never backwards, the stream ends at a final state
and when the agent stops."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from service_fakes import AUTH, TOKEN, VM_1, Client, FakeFactory, FakeInventory, Script, body, make_config

from agent.api import models
from agent.api.app import make_app
from agent.client.sse import SseParser

MIGRATE = f"/v1/vms/{VM_1}/storage-migrations"


async def start(aiohttp_client: Any, tmp_path: Path, script: Script) -> Client:
    app = make_app(
        make_config(tmp_path), token=TOKEN, engine_factory=FakeFactory(script), inventory=FakeInventory(VM_1)
    )
    client: Client = await aiohttp_client(app)
    return client


async def read_events(client: Client, task_uuid: str) -> list[tuple[str, dict[str, Any]]]:
    resp = await client.get(f"/v1/tasks/{task_uuid}/events", headers=AUTH)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    parser = SseParser()
    events: list[tuple[str, dict[str, Any]]] = []
    async with asyncio.timeout(10):
        async for chunk in resp.content.iter_any():
            events += [(e.event, json.loads(e.data)) for e in parser.feed(chunk)]
    return events


async def test_events_follow_the_task_to_its_end(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(steps=30, step_s=0.02)
    client = await start(aiohttp_client, tmp_path, script)
    task = await (await client.post(MIGRATE, json=body(), headers=AUTH)).json()
    events = await read_events(client, task["taskUuid"])
    views = [models.TaskView.model_validate(data) for _, data in events]
    percents = [view.progress.percent for view in views]
    assert percents == sorted(percents), "percent went backwards"
    assert views[-1].state == "SUCCEEDED" and percents[-1] == 100.0
    assert all(p < 100.0 for p in percents[:-1])
    assert len(events) >= 3
    assert events[0][0] == "state" and events[-1][0] == "state"
    assert "progress" in {kind for kind, _ in events}
    states_seen = [view.state for view in views]
    assert states_seen.index("COPYING") < states_seen.index("SUCCEEDED")


async def test_events_of_a_finished_task_give_one_final_view(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, Script())
    task = await (await client.post(MIGRATE, json=body(), headers=AUTH)).json()
    await read_events(client, task["taskUuid"])
    events = await read_events(client, task["taskUuid"])
    assert len(events) == 1 and events[0][1]["state"] == "SUCCEEDED"


async def test_events_end_when_the_agent_stops(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(aiohttp_client, tmp_path, script)
    task = await (await client.post(MIGRATE, json=body(), headers=AUTH)).json()
    reader = asyncio.create_task(read_events(client, task["taskUuid"]))
    await asyncio.sleep(0.2)
    async with asyncio.timeout(5):
        await client.server.close()  # shutdown: the stream must end on its own, well within the grace
    events = await reader
    assert events and events[-1][1]["state"] != "SUCCEEDED"
    assert script.cancelled == [True]  # detached, not cancelled by the user


async def test_events_of_unknown_task_is_404(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, Script())
    resp = await client.get("/v1/tasks/11111111-2222-4333-8444-000000000000/events", headers=AUTH)
    assert resp.status == 404
    assert (await resp.json())["code"] == "AGENT.NOT_FOUND"
