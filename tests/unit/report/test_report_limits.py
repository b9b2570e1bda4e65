"""Where reports may go and what a management server can make the agent do (issue 22): callback and
progress URLs only to the address the request came from or ``[report] allowed_networks``, no redirects,
an answer read only up to a cap, final reports given up after a bounded number of attempts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from service_fakes import AUTH, body, eventually
from test_report import MIGRATE, start_agent, wait_final

from agent.api.keys import JOURNAL


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("callbackUrl", "http://169.254.169.254/latest/meta-data/"),  # a cloud's metadata service
        ("progressUrl", "http://127.0.0.2:7070/v1/tasks"),  # a loopback address the caller is not
        ("callbackUrl", "http://user:pw@127.0.0.1/x"),
    ],
)
async def test_a_report_url_goes_only_where_the_request_came_from(
    tmp_path: Path, field: str, url: str
) -> None:
    client = await start_agent(tmp_path)
    try:
        resp = await client.post(MIGRATE, json=body(**{field: url}), headers=AUTH)
        answer = await resp.json()
        assert resp.status == 400 and answer["field"] == field, answer
        assert (await (await client.get("/v1/tasks", headers=AUTH)).json())["tasks"] == []
    finally:
        await client.close()


async def test_allowed_networks_open_other_addresses(tmp_path: Path) -> None:
    client = await start_agent(tmp_path, report={"allowed_networks": ["169.254.0.0/16"]})
    try:
        url = "http://169.254.169.254/cb"
        resp = await client.post(MIGRATE, json=body(callbackUrl=url), headers=AUTH)
        assert resp.status == 202, await resp.text()
    finally:
        await client.close()


class Hostile:
    """A management server that redirects, answers without end, or always fails."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.app = web.Application()
        self.app.router.add_post("/redirect", self._redirect)
        self.app.router.add_post("/elsewhere", self._record)
        self.app.router.add_post("/endless", self._endless)
        self.app.router.add_post("/fails", self._fails)

    async def _redirect(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        raise web.HTTPTemporaryRedirect("/elsewhere")

    async def _record(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(status=200)

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 65536
        while True:  # until the agent hangs up
            await response.write(chunk)
            await asyncio.sleep(0.01)

    async def _fails(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(status=500)


@pytest.fixture
async def hostile(aiohttp_server: Any) -> tuple[Hostile, TestServer]:
    fake = Hostile()
    return fake, await aiohttp_server(fake.app)


async def outbox_rows(client: Any) -> list[Any]:
    journal = client.server.app[JOURNAL]
    return list(await journal.due_outbox(1e12, 100))


async def test_a_redirect_is_not_followed(tmp_path: Path, hostile: tuple[Hostile, TestServer]) -> None:
    fake, server = hostile
    client = await start_agent(tmp_path)
    try:
        payload = body(callbackUrl=str(server.make_url("/redirect")))
        task = await (await client.post(MIGRATE, json=payload, headers=AUTH)).json()
        await wait_final(client, task["taskUuid"])
        await eventually(lambda: len(fake.hits) >= 2)
        assert "/elsewhere" not in fake.hits
    finally:
        await client.close()


async def test_an_endless_answer_is_cut_and_the_report_delivered(
    tmp_path: Path, hostile: tuple[Hostile, TestServer]
) -> None:
    fake, server = hostile
    client = await start_agent(tmp_path, report={"timeout_s": 1.0})
    try:
        payload = body(callbackUrl=str(server.make_url("/endless")))
        task = await (await client.post(MIGRATE, json=payload, headers=AUTH)).json()
        await wait_final(client, task["taskUuid"])
        await eventually(lambda: len(fake.hits) >= 1)
        await asyncio.sleep(1.5)  # past the report timeout: a reader of the whole answer fails by now
        assert len(fake.hits) == 1 and await outbox_rows(client) == []
    finally:
        await client.close()


async def test_a_final_report_is_given_up_after_its_attempts(
    tmp_path: Path, hostile: tuple[Hostile, TestServer]
) -> None:
    fake, server = hostile
    client = await start_agent(tmp_path, report={"retry_max_attempts": 3})
    try:
        payload = body(callbackUrl=str(server.make_url("/fails")))
        task = await (await client.post(MIGRATE, json=payload, headers=AUTH)).json()
        view = await wait_final(client, task["taskUuid"])
        await eventually(lambda: len(fake.hits) >= 3)
        await asyncio.sleep(1.0)  # retries come every 0.05-0.2 s here: a fourth would have come
        assert len(fake.hits) == 3 and await outbox_rows(client) == []
        # The result stays where GET finds it.
        again = await (await client.get(f"/v1/tasks/{task['taskUuid']}", headers=AUTH)).json()
        assert again["state"] == view["state"] == "SUCCEEDED"
    finally:
        await client.close()
