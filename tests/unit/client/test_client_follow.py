"""``follow_task``: the event stream when it works, polling when it does not, short outages waited out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_agent_api import TOKEN, FakeAgent, error_code, failure_script, success_script

from agent.client import (
    AgentClient,
    AgentUnreachable,
    ApiError,
    ServerEvent,
    TaskView,
    apply_event,
    follow_task,
)

ServerFactory = Callable[..., Awaitable[TestServer]]


def fast(
    client: AgentClient, task_uuid: str, *, use_events: bool = True, unreachable_for: float = 0.5
) -> AsyncIterator[TaskView]:
    """``follow_task`` with pauses short enough for unit tests."""
    return follow_task(
        client,
        task_uuid,
        poll_interval=0.01,
        idle_timeout=0.3,
        unreachable_for=unreachable_for,
        use_events=use_events,
    )


@pytest.fixture
def fake() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
async def client(fake: FakeAgent, aiohttp_server: ServerFactory) -> AsyncIterator[AgentClient]:
    server = await aiohttp_server(fake.app())
    async with AgentClient(str(server.make_url("/")), TOKEN) as agent:
        yield agent


async def states(
    client: AgentClient, task_uuid: str, *, use_events: bool = True, unreachable_for: float = 0.5
) -> list[str]:
    return [
        task["state"]
        async for task in fast(client, task_uuid, use_events=use_events, unreachable_for=unreachable_for)
    ]


async def test_follows_the_event_stream_and_ends_with_the_full_final_task(
    client: AgentClient, fake: FakeAgent
) -> None:
    fake.add_task("t1", success_script("t1"))
    snapshots = [task async for task in fast(client, "t1")]
    assert [t["state"] for t in snapshots] == ["PENDING", "COPYING", "COPYING", "SWITCHING", "SUCCEEDED"]
    assert snapshots[-1]["inventory"]["volumes"][0]["installPath"].endswith("vol-root.qcow2")
    assert len(fake.calls("GET", "/events")) == 1


async def test_polls_when_the_agent_has_no_event_stream(client: AgentClient, fake: FakeAgent) -> None:
    fake.add_task("t1", failure_script("t1"))
    fake.events_status = 404
    assert await states(client, "t1") == ["PENDING", "CONVERGING", "FAILED"]
    assert len(fake.calls("GET", "/events")) == 1  # refused once, not asked again


async def test_polls_when_told_not_to_use_events(client: AgentClient, fake: FakeAgent) -> None:
    fake.add_task("t1", failure_script("t1", "CANCELLED"))
    assert await states(client, "t1", use_events=False) == ["PENDING", "CONVERGING", "CANCELLED"]
    assert fake.calls("GET", "/events") == []


async def test_a_quiet_stream_is_left_for_a_poll(client: AgentClient, fake: FakeAgent) -> None:
    fake.add_task("t1", failure_script("t1"))
    fake.events_idle = True
    assert (await states(client, "t1"))[-1] == "FAILED"


async def test_an_unknown_task_raises_at_once(client: AgentClient) -> None:
    with pytest.raises(ApiError) as caught:
        await states(client, "nope")
    assert caught.value.status == 404


async def test_an_agent_restart_is_waited_out(aiohttp_server: ServerFactory) -> None:
    answers = [503, 503, 200]

    async def task(request: web.Request) -> web.Response:
        status = answers.pop(0) if answers else 200
        if status != 200:
            return web.json_response(error_code("AGENT.STOPPING", "stopping"), status=status)
        return web.json_response({"taskUuid": "t1", "state": "SUCCEEDED"})

    app = web.Application()
    app.router.add_get("/v1/tasks/t1", task)
    server = await aiohttp_server(app)
    async with AgentClient(str(server.make_url("/")), TOKEN) as agent:
        # The third answer is 200 whatever the time: the bound is not what is tested here, and the default
        # 0.5 s ran out under load (two 503s, each with its poll interval, in a full unit run beside a lab).
        assert await states(agent, "t1", unreachable_for=30) == ["SUCCEEDED"]


async def test_an_agent_that_stays_away_ends_the_follow(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(FakeAgent().app())
    url = str(server.make_url("/"))
    await server.close()
    async with AgentClient(url, TOKEN) as agent:
        with pytest.raises(AgentUnreachable):
            await states(agent, "t1", unreachable_for=0.1)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            ServerEvent("task", '{"state": "COPYING", "phase": "disks"}'),
            {"state": "COPYING", "phase": "disks"},
        ),
        (ServerEvent("message", '{"task": {"state": "SWITCHING"}}'), {"state": "SWITCHING"}),
        (ServerEvent("progress", '{"percent": 50.0}'), {"progress": {"percent": 50.0, "bytesDone": 1}}),
        (ServerEvent("message", "not json"), {}),
        (ServerEvent("message", "[1, 2]"), {}),
        (ServerEvent("ping", '{"at": 1}'), {}),
    ],
)
def test_apply_event(event: ServerEvent, expected: dict[str, object]) -> None:
    before: TaskView = {"taskUuid": "t1", "state": "PENDING", "progress": {"percent": 10.0, "bytesDone": 1}}
    assert apply_event(before, event) == {**before, **expected}
