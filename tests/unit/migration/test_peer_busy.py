"""A source waits, within a bound, for a destination whose limits are full (429 AGENT.BUSY), then goes on or
fails with that code; any other refusal is final at once."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.client import AgentClient
from agent.errors import MigrationFailed
from agent.migration.peer.client import peer_call_when_free


def destination(answers: list[int]) -> tuple[web.Application, list[int]]:
    seen: list[int] = []

    async def prepare(request: web.Request) -> web.Response:
        status = answers[len(seen)] if len(seen) < len(answers) else answers[-1]
        seen.append(status)
        if status == 429:
            body = {"code": "AGENT.BUSY", "description": "full", "details": None, "cause": None}
            return web.json_response(body, status=429, headers={"Retry-After": "10"})
        if status == 409:
            body = {"code": "AGENT.NO_SPACE", "description": "no room", "details": None, "cause": None}
            return web.json_response(body, status=409)
        return web.json_response({"migrationId": "m"}, status=201)

    app = web.Application()
    app.router.add_post("/v1/incoming-migrations", prepare)
    return app, seen


async def call(server: TestServer, **options: Any) -> Any:
    async with AgentClient(str(server.make_url("/")).rstrip("/")) as peer:
        return await peer_call_when_free(peer, "POST", ("v1", "incoming-migrations"), {}, **options)


async def test_waits_while_busy_then_goes_on(aiohttp_server: Any) -> None:
    app, seen = destination([429, 429, 201])
    server = await aiohttp_server(app)
    assert await call(server, every_s=0.05) == {"migrationId": "m"}
    assert seen == [429, 429, 201]


async def test_fails_busy_past_its_bound(aiohttp_server: Any) -> None:
    app, seen = destination([429])
    server = await aiohttp_server(app)
    with pytest.raises(MigrationFailed) as busy:
        await call(server, within_s=0.3, every_s=0.05)
    assert busy.value.code == "AGENT.BUSY" and 3 <= len(seen) <= 7


async def test_another_refusal_is_final(aiohttp_server: Any) -> None:
    app, seen = destination([409, 201])
    server = await aiohttp_server(app)
    with pytest.raises(MigrationFailed) as refused:
        await call(server, every_s=0.05)
    assert refused.value.code == "AGENT.NO_SPACE" and seen == [409]
