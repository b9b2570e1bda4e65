"""Reports to a real loopback management plane: the final callback (outbox, retries, across restarts) and
coalesced progress POSTs; a dead or slow server never slows or breaks a migration."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from service_fakes import (
    AUTH,
    TOKEN,
    VM_1,
    Client,
    FakeFactory,
    FakeInventory,
    Receiver,
    Script,
    body,
    eventually,
    make_config,
)

from agent.api import models
from agent.api.app import make_app
from agent.api.keys import JOURNAL
from agent.config import ReportConfig
from agent.report.outbox import backoff_delay
from agent.report.progress import ProgressReporter

MIGRATE = f"/v1/vms/{VM_1}/storage-migrations"


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[Receiver, TestServer]:
    fake = Receiver()
    server: TestServer = await aiohttp_server(fake.app)
    return fake, server


async def start_agent(tmp_path: Path, script: Script | None = None, **config: Any) -> Client:
    app = make_app(
        make_config(tmp_path, **config),
        token=TOKEN,
        engine_factory=FakeFactory(script or Script()),
        inventory=FakeInventory(VM_1),
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def wait_final(client: Client, task_uuid: str) -> dict[str, Any]:
    view: dict[str, Any] = {}

    async def final() -> bool:
        nonlocal view
        view = await (await client.get(f"/v1/tasks/{task_uuid}", headers=AUTH)).json()
        return view["state"] in ("SUCCEEDED", "FAILED", "CANCELLED")

    await eventually(final)
    return view


async def test_final_result_reaches_the_callback_in_the_seed_shape(
    tmp_path: Path, receiver: tuple[Receiver, TestServer]
) -> None:
    fake, server = receiver
    client = await start_agent(tmp_path)
    try:
        payload = body(callbackUrl=str(server.make_url("/callback")))
        task = await (await client.post(MIGRATE, json=payload, headers=AUTH)).json()
        await eventually(lambda: len(fake.of("/callback")) == 1)
        (call,) = fake.of("/callback")
        assert call.headers["taskuuid"] == task["taskUuid"]
        assert "Authorization" not in call.headers
        result = models.CallbackBody.model_validate(call.body)
        assert result.success is True and result.error is None
        assert result.inventory is not None and result.inventory["volumes"][0]["uuid"] == "vol-root"

        async def delivered() -> bool:
            # The receiver records the call before it answers; the row is marked once the answer is in.
            rows = await client.app[JOURNAL].outbox_entries(task["taskUuid"])
            return rows[0]["delivered_at"] is not None

        await eventually(delivered)
    finally:
        await client.close()


async def test_failure_is_reported_with_its_error_code(
    tmp_path: Path, receiver: tuple[Receiver, TestServer]
) -> None:
    from agent.errors import MigrationFailed

    fake, server = receiver
    client = await start_agent(tmp_path, Script(fail=MigrationFailed("nope", code="AGENT.X")))
    try:
        await client.post(MIGRATE, json=body(callbackUrl=str(server.make_url("/callback"))), headers=AUTH)
        await eventually(lambda: len(fake.of("/callback")) == 1)
        result = fake.of("/callback")[0].body
        assert result["success"] is False and result["error"]["code"] == "AGENT.X"
        assert result["inventory"] is None
    finally:
        await client.close()


async def test_callback_retried_while_the_receiver_is_down(
    tmp_path: Path, receiver: tuple[Receiver, TestServer]
) -> None:
    fake, server = receiver
    fake.status = 503
    client = await start_agent(tmp_path)
    try:
        task = await (
            await client.post(MIGRATE, json=body(callbackUrl=str(server.make_url("/callback"))), headers=AUTH)
        ).json()
        await eventually(lambda: len(fake.of("/callback")) >= 3)
        view = await wait_final(client, task["taskUuid"])
        assert view["state"] == "SUCCEEDED"  # the dead server did not hold the migration back
        fake.status = 200
        count = len(fake.received)
        await eventually(lambda: fake.received[-1].body.get("success") is True and len(fake.received) > count)
        await asyncio.sleep(0.5)
        assert all(r.body["taskUuid"] == task["taskUuid"] for r in fake.of("/callback"))
        rows = await client.app[JOURNAL].outbox_entries(task["taskUuid"])
        assert rows[0]["delivered_at"] is not None and rows[0]["attempts"] >= 3
        metrics = await (await client.get("/metrics", headers=AUTH)).text()
        assert 'kvm_agent_report_failures_total{kind="callback"}' in metrics
        delivered_calls = len(fake.of("/callback"))
        await asyncio.sleep(0.3)
        assert len(fake.of("/callback")) == delivered_calls  # nothing more once delivered
    finally:
        await client.close()


async def test_callback_survives_an_agent_restart(
    tmp_path: Path, unused_tcp_port_factory: Any, aiohttp_server: Any
) -> None:
    port = unused_tcp_port_factory()
    url = f"http://127.0.0.1:{port}/callback"
    client = await start_agent(tmp_path)  # the receiver does not even listen yet
    task = await (await client.post(MIGRATE, json=body(callbackUrl=url), headers=AUTH)).json()
    await wait_final(client, task["taskUuid"])
    await eventually(lambda: _attempts(client, task["taskUuid"], at_least=2))
    await client.close()

    fake = Receiver()
    await aiohttp_server(fake.app, port=port)
    client2 = await start_agent(tmp_path)
    try:
        await eventually(lambda: len(fake.of("/callback")) == 1)
        (call,) = fake.of("/callback")
        assert call.headers["taskuuid"] == task["taskUuid"] and call.body["success"] is True
        view = await (await client2.get(f"/v1/tasks/{task['taskUuid']}", headers=AUTH)).json()
        assert view["state"] == "SUCCEEDED"
    finally:
        await client2.close()


async def _attempts(client: Client, task_uuid: str, at_least: int) -> bool:
    rows = await client.app[JOURNAL].outbox_entries(task_uuid)
    return bool(rows) and rows[0]["attempts"] >= at_least


async def test_progress_is_coalesced_at_most_once_per_interval(
    tmp_path: Path, receiver: tuple[Receiver, TestServer]
) -> None:
    fake, server = receiver
    script = Script(steps=200, step_s=0.005)  # about 1 s of rapid progress
    client = await start_agent(tmp_path, script, report={"progress_interval_s": 0.2})
    try:
        payload = body(progressUrl=str(server.make_url("/progress")))
        started = time.monotonic()
        task = await (await client.post(MIGRATE, json=payload, headers=AUTH)).json()
        await wait_final(client, task["taskUuid"])
        elapsed = time.monotonic() - started
        await eventually(lambda: fake.of("/progress")[-1].body["state"] == "SUCCEEDED")
        reports = fake.of("/progress")
        assert len(reports) <= elapsed / 0.2 + 3
        assert len(reports) >= 2
        gaps = [b.at - a.at for a, b in itertools.pairwise(reports)]
        assert min(gaps) >= 0.15
        percents = [r.body["progress"]["percent"] for r in reports]
        assert percents == sorted(percents) and percents[-1] == 100.0
        assert all(r.headers["taskuuid"] == task["taskUuid"] for r in reports)
        models.ProgressReportBody.model_validate(reports[-1].body)
    finally:
        await client.close()


async def test_a_slow_management_server_does_not_slow_the_migration(
    tmp_path: Path, receiver: tuple[Receiver, TestServer]
) -> None:
    fake, server = receiver
    fake.delay = 1.5
    script = Script(steps=20, step_s=0.01)
    client = await start_agent(tmp_path, script, report={"timeout_s": 5.0})
    try:
        payload = body(
            progressUrl=str(server.make_url("/progress")), callbackUrl=str(server.make_url("/callback"))
        )
        started = time.monotonic()
        task = await (await client.post(MIGRATE, json=payload, headers=AUTH)).json()
        view = await wait_final(client, task["taskUuid"])
        assert view["state"] == "SUCCEEDED"
        assert time.monotonic() - started < 1.2
        await eventually(lambda: len(fake.of("/callback")) == 1, within=10)
    finally:
        await client.close()


async def test_progress_reporter_latest_wins_without_a_queue() -> None:
    sent: list[int] = []

    async def handler(request: aiohttp.web.Request) -> aiohttp.web.Response:
        sent.append((await request.json())["n"])
        return aiohttp.web.Response()

    app = aiohttp.web.Application()
    app.router.add_post("/p", handler)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        reporter = ProgressReporter(session, interval_s=0.3, timeout_s=1.0)
        url = str(server.make_url("/p"))
        for n in range(100):
            reporter.push("t", url, functools.partial(dict, n=n))
            await asyncio.sleep(0)
        await eventually(lambda: 99 in sent)
        assert sent[0] == 0 and len(sent) <= 3  # the first at once, then only the latest
        reporter.push("t", url, lambda: {"n": 1000}, final=True)
        await eventually(lambda: sent[-1] == 1000)
        await eventually(lambda: reporter.active_senders == 0)
        await reporter.close()


def test_backoff_grows_exponentially_and_caps() -> None:
    policy = ReportConfig(retry_initial_s=1.0, retry_max_s=30.0)
    mid = [backoff_delay(policy, attempts, rand=lambda: 0.5) for attempts in range(1, 8)]
    assert mid == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_delay(policy, 1, rand=lambda: 0.0) == pytest.approx(0.8)
    assert backoff_delay(policy, 1, rand=lambda: 1.0) == pytest.approx(1.2)


async def test_gives_up_after_retry_for_s(tmp_path: Path, unused_tcp_port_factory: Any) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port_factory()}/callback"
    client = await start_agent(tmp_path, report={"retry_for_s": 0.3})
    try:
        task = await (await client.post(MIGRATE, json=body(callbackUrl=url), headers=AUTH)).json()

        async def given_up() -> bool:
            rows = await client.app[JOURNAL].outbox_entries(task["taskUuid"])
            return bool(rows) and rows[0]["given_up_at"] is not None

        await eventually(given_up)
    finally:
        await client.close()
