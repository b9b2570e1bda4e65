"""``AgentClient`` against a real aiohttp server on loopback that mimics the agent's API."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_agent_api import STORAGE_UUID, TOKEN, VM_UUID, FakeAgent, error_code

from agent.client import AgentClient, AgentUnreachable, ApiError, BadResponse, ClientError
from agent.errors import MigrationFailed
from agent.migration.request import MigrationRequest

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def fake() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
async def client(fake: FakeAgent, aiohttp_server: ServerFactory) -> AsyncIterator[AgentClient]:
    server = await aiohttp_server(fake.app())
    async with AgentClient(str(server.make_url("/")), TOKEN) as agent:
        yield agent


async def serve(aiohttp_server: ServerFactory, handler: Callable[..., Awaitable[web.StreamResponse]]) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url(""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_health_sends_no_token_and_the_rest_send_the_bearer_token(
    client: AgentClient, fake: FakeAgent
) -> None:
    assert (await client.health())["status"] == "ok"
    await client.tasks()
    health, tasks = fake.requests
    assert "Authorization" not in health.headers
    assert tasks.headers["Authorization"] == f"Bearer {TOKEN}"


async def test_a_wrong_token_is_an_api_error_with_status_401(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(FakeAgent().app())
    async with AgentClient(str(server.make_url("/")), "wrong") as agent:
        with pytest.raises(ApiError) as caught:
            await agent.list_vms()
    assert caught.value.status == 401
    assert caught.value.code == "AGENT.UNAUTHORIZED"
    assert not caught.value.transient


async def test_start_migration_posts_the_body_as_given(client: AgentClient, fake: FakeAgent) -> None:
    body = {
        "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_UUID},
        "migrateVm": {"bandwidth": 50},
    }
    task = await client.start_migration(VM_UUID, body)
    (call,) = fake.calls("POST")
    assert call.path == f"/v1/vms/{VM_UUID}/storage-migrations"
    assert call.body == body
    assert call.headers["Content-Type"] == "application/json"
    assert task["state"] == "PENDING"
    assert task["taskUuid"] in fake.tasks


async def test_start_migration_with_a_model_sends_only_what_was_set(
    client: AgentClient, fake: FakeAgent
) -> None:
    request = MigrationRequest.model_validate(
        {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_UUID, "withSnapshots": True}}
    )
    await client.start_migration(VM_UUID, request)
    (call,) = fake.calls("POST")
    assert call.body == {
        "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_UUID, "withSnapshots": True}
    }


async def test_error_code_body_and_status_are_kept(client: AgentClient, fake: FakeAgent) -> None:
    refusal = error_code("AGENT.STORAGE_NOT_FOUND", "unknown storage", field="dstPrimaryStorageUuid")
    fake.fail_with = (400, refusal)
    with pytest.raises(ApiError) as caught:
        await client.start_migration(VM_UUID, {})
    err = caught.value
    assert (err.status, err.code, err.field, err.description) == (
        400,
        "AGENT.STORAGE_NOT_FOUND",
        "dstPrimaryStorageUuid",
        "unknown storage",
    )
    assert err.error == refusal
    assert str(err) == "HTTP 400: AGENT.STORAGE_NOT_FOUND: unknown storage"


async def test_a_peer_error_wrapped_by_the_agent_shows_up_verbatim_as_the_cause(
    client: AgentClient, fake: FakeAgent
) -> None:
    refusal = error_code("AGENT.CONFLICT", "the VM already has a task", cause=error_code("X.INNER", "inner"))
    fake.fail_with = (409, refusal)
    try:
        await client.task("t")
    except ClientError as err:
        wrapped = MigrationFailed("the destination refused")
        wrapped.__cause__ = err
    assert wrapped.to_error_code()["cause"] == refusal


async def test_the_seed_response_shape_is_unwrapped(aiohttp_server: ServerFactory) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {"success": False, "error": error_code("AGENT.STOPPING", "stopping")}, status=503
        )

    async with AgentClient(await serve(aiohttp_server, handler), TOKEN) as agent:
        with pytest.raises(ApiError) as caught:
            await agent.host()
    assert caught.value.code == "AGENT.STOPPING"
    assert caught.value.transient


async def test_a_non_agent_error_page_becomes_an_error_code(client: AgentClient) -> None:
    with pytest.raises(ApiError) as caught:
        await client.request("GET", "v2", "nothing")
    assert caught.value.status == 404
    assert caught.value.code == "CLIENT.HTTP_404"


async def test_a_non_json_answer_is_a_bad_response(aiohttp_server: ServerFactory) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>")

    async with AgentClient(await serve(aiohttp_server, handler)) as agent:
        with pytest.raises(BadResponse):
            await agent.host()


async def test_path_segments_are_quoted_whole(client: AgentClient, fake: FakeAgent) -> None:
    with pytest.raises(ApiError):
        await client.task("../vms")
    assert fake.requests[-1].raw_path == "/v1/tasks/..%2Fvms"


async def test_lists_come_bare_or_wrapped(client: AgentClient, fake: FakeAgent) -> None:
    fake.vms = [{"uuid": VM_UUID, "name": "guest"}]
    assert await client.list_vms() == fake.vms
    assert await client.tasks() == []


async def test_patch_sends_only_the_given_values(client: AgentClient, fake: FakeAgent) -> None:
    fake.add_task("t1", [{"taskUuid": "t1", "state": "COPYING"}])
    await client.patch_task("t1", bandwidth=20)
    await client.patch_task("t1", downtime=500)
    assert [c.body for c in fake.calls("PATCH")] == [{"bandwidth": 20}, {"downTime": 500}]
    with pytest.raises(ValueError):
        await client.patch_task("t1")


async def test_cancel_posts_to_the_cancel_endpoint(client: AgentClient, fake: FakeAgent) -> None:
    fake.add_task("t1", [{"taskUuid": "t1", "state": "COPYING"}])
    assert (await client.cancel("t1"))["state"] == "CANCELLING"
    assert fake.calls("POST")[0].path == "/v1/tasks/t1/cancel"


async def test_connection_refused_is_unreachable() -> None:
    async with AgentClient(f"http://127.0.0.1:{free_port()}", TOKEN) as agent:
        with pytest.raises(AgentUnreachable) as caught:
            await agent.health()
    assert caught.value.status is None
    assert caught.value.transient
    assert "unreachable" in caught.value.description


async def test_a_slow_agent_times_out_as_unreachable(aiohttp_server: ServerFactory) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    timeout = aiohttp.ClientTimeout(total=0.2)
    async with AgentClient(await serve(aiohttp_server, handler), timeout=timeout) as agent:
        with pytest.raises(AgentUnreachable, match="timed out"):
            await agent.health()


async def test_events_are_parsed_from_the_stream(client: AgentClient, fake: FakeAgent) -> None:
    fake.add_task("t1", [{"taskUuid": "t1", "state": s} for s in ("PENDING", "COPYING", "SUCCEEDED")])
    events = [event async for event in client.events("t1")]
    assert [e.json()["state"] for e in events] == ["PENDING", "COPYING", "SUCCEEDED"]
    assert {e.event for e in events} == {"task"}
    (call,) = fake.calls("GET", "/events")
    assert call.headers["Accept"] == "text/event-stream"
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"


async def test_events_of_an_unknown_task_is_an_api_error(client: AgentClient) -> None:
    with pytest.raises(ApiError) as caught:
        _ = [event async for event in client.events("nope")]
    assert caught.value.status == 404


async def test_events_that_are_not_an_event_stream_are_a_bad_response(aiohttp_server: ServerFactory) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"state": "COPYING"})

    async with AgentClient(await serve(aiohttp_server, handler)) as agent:
        with pytest.raises(BadResponse, match="expected an event stream"):
            _ = [event async for event in agent.events("t1")]


async def test_a_borrowed_session_stays_open(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(FakeAgent().app())
    async with aiohttp.ClientSession() as session:
        async with AgentClient(str(server.make_url("/")), session=session) as agent:
            await agent.health()
        assert not session.closed


@pytest.mark.parametrize("url", ["ftp://host", "localhost:7070", "http://"])
def test_a_url_that_is_not_http_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        AgentClient(url)
