"""The HTTP API on loopback with a fake engine: auth, every error shape, idempotency, cancel, retune,
queueing, views checked against the response models."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from service_fakes import (
    AUTH,
    STORAGE_A,
    STORAGE_B,
    TOKEN,
    UNKNOWN_VM,
    VM_1,
    VM_2,
    Client,
    FakeFactory,
    FakeInventory,
    FakeStreams,
    Script,
    body,
    eventually,
    make_config,
)

from agent.api import models
from agent.api.app import make_app
from agent.api.keys import SERVICE

MIGRATE = "/v1/vms/{}/storage-migrations"


async def start(
    aiohttp_client: Any,
    tmp_path: Path,
    script: Script | None = None,
    inventory: Any = "default",
    **config: Any,
) -> Client:
    app = make_app(
        make_config(tmp_path, **config),
        token=TOKEN,
        engine_factory=FakeFactory(script or Script()),
        inventory=FakeInventory(VM_1, VM_2) if inventory == "default" else inventory,
    )
    client: Client = await aiohttp_client(app)
    return client


async def wait_state(client: Client, task_uuid: str, *states: str) -> dict[str, Any]:
    view: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal view
        resp = await client.get(f"/v1/tasks/{task_uuid}", headers=AUTH)
        view = await resp.json()
        return view["state"] in states

    await eventually(reached)
    return view


async def assert_error(resp: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    error: dict[str, Any] = await resp.json()
    models.ErrorCode.model_validate(error)
    assert error["code"] == code, error
    assert set(error) >= {"code", "description", "details", "cause"}
    if field is not None:
        assert error.get("field") == field, error
    return error


# -- auth -------------------------------------------------------------------------------------------------


async def test_health_needs_no_token(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    resp = await client.get("/v1/health")
    assert resp.status == 200
    assert models.Health.model_validate(await resp.json()).status == "ok"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic abc"}],
)
async def test_everything_else_needs_the_token(
    aiohttp_client: Any, tmp_path: Path, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await start(aiohttp_client, tmp_path)
    for method, path in [
        ("GET", "/v1/tasks"),
        ("GET", "/v1/vms"),
        ("GET", "/metrics"),
        ("GET", "/v1/host"),
        ("POST", MIGRATE.format(VM_1)),
        ("GET", "/v1/openapi.json"),
    ]:
        resp = await client.request(method, path, headers=headers, json=body())
        await assert_error(resp, 401, "AGENT.UNAUTHORIZED")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in caplog.text


async def test_token_never_appears_in_logs_or_views(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await start(aiohttp_client, tmp_path)
    dst_token = "dst-agent-secret"
    payload = body(
        primaryStorageMigrateVm={"dstPrimaryStorageUuid": STORAGE_A, "dstHostUuid": "aa" * 16},
        dstHost={"uuid": "aa" * 16, "agentUrl": "http://127.0.0.1:1", "token": dst_token},
    )
    resp = await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)
    assert resp.status == 202
    view = await resp.json()
    await wait_state(client, view["taskUuid"], "SUCCEEDED")
    text = await (await client.get("/v1/tasks", headers=AUTH)).text()
    assert dst_token not in text and TOKEN not in text
    assert dst_token not in caplog.text and TOKEN not in caplog.text


# -- a migration, end to end ------------------------------------------------------------------------------


async def test_migration_is_accepted_runs_and_shows_a_complete_view(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client = await start(aiohttp_client, tmp_path)
    resp = await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)
    assert resp.status == 202
    accepted = models.TaskView.model_validate(await resp.json())
    assert resp.headers["Location"] == f"/v1/tasks/{accepted.taskUuid}"
    assert accepted.vmUuid == VM_1 and accepted.state in ("PENDING", "PREPARING", "COPYING")
    view = await wait_state(client, accepted.taskUuid, "SUCCEEDED")
    checked = models.TaskView.model_validate(view)
    assert [s.state for s in checked.states] == [
        "PENDING",
        "PREPARING",
        "COPYING",
        "SWITCHING",
        "VERIFYING",
        "SUCCEEDED",
    ]
    assert checked.progress.percent == 100.0
    assert checked.progress.bytesDone == checked.progress.bytesTotal == 2500
    assert {v.name for v in checked.volumes} == {"vol-root", "vol-data", "memory"}
    assert checked.downtimeMs == 42
    assert checked.inventory == {
        "vmUuid": VM_1,
        "volumes": [{"uuid": "vol-root", "installPath": "/new/root.qcow2", "format": "qcow2", "size": 1000}],
    }
    assert checked.request["primaryStorageMigrateVm"]["dstPrimaryStorageUuid"] == STORAGE_A
    listed = await (await client.get("/v1/tasks", headers=AUTH)).json()
    models.TaskList.model_validate(listed)
    assert [t["taskUuid"] for t in listed["tasks"]] == [accepted.taskUuid]
    filtered = await (await client.get(f"/v1/tasks?state=failed&vmUuid={VM_1}", headers=AUTH)).json()
    assert filtered == {"tasks": []}


async def test_32_hex_uuids_are_accepted_and_normalised(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    hex_vm = VM_1.replace("-", "")
    task_hex = "ab" * 16
    resp = await client.post(MIGRATE.format(hex_vm), json=body(taskUuid=task_hex), headers=AUTH)
    assert resp.status == 202
    view = await resp.json()
    assert view["vmUuid"] == VM_1
    again = await client.get(f"/v1/tasks/{task_hex}", headers=AUTH)
    assert (await again.json())["taskUuid"] == view["taskUuid"]


# -- idempotency, conflicts -------------------------------------------------------------------------------


async def test_same_task_uuid_gives_the_same_task(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(aiohttp_client, tmp_path, script)
    task_uuid = "c0ffee00-0000-4000-8000-000000000001"
    first = await client.post(MIGRATE.format(VM_1), json=body(taskUuid=task_uuid), headers=AUTH)
    second = await client.post(MIGRATE.format(VM_1), json=body(taskUuid=task_uuid), headers=AUTH)
    by_header = await client.post(MIGRATE.format(VM_1), json=body(), headers={**AUTH, "taskuuid": task_uuid})
    for resp in (first, second, by_header):
        assert resp.status == 202
        assert (await resp.json())["taskUuid"] == task_uuid
    assert len(script.calls) == 1
    listed = await (await client.get("/v1/tasks", headers=AUTH)).json()
    assert len(listed["tasks"]) == 1
    script.gate.set()  # type: ignore[union-attr]
    await wait_state(client, task_uuid, "SUCCEEDED")
    after = await client.post(MIGRATE.format(VM_1), json=body(taskUuid=task_uuid), headers=AUTH)
    assert after.status == 202 and (await after.json())["state"] == "SUCCEEDED"


async def test_vm_with_an_active_task_is_409(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(aiohttp_client, tmp_path, script)
    first = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    resp = await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)
    error = await assert_error(resp, 409, "AGENT.CONFLICT")
    assert error["extra"]["taskUuid"] == first["taskUuid"]
    reused = await client.post(MIGRATE.format(VM_2), json=body(taskUuid=first["taskUuid"]), headers=AUTH)
    await assert_error(reused, 409, "AGENT.CONFLICT", "taskUuid")
    script.gate.set()  # type: ignore[union-attr]


async def test_header_and_body_task_uuid_must_agree(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    resp = await client.post(
        MIGRATE.format(VM_1),
        json=body(taskUuid="c0ffee00-0000-4000-8000-000000000001"),
        headers={**AUTH, "taskuuid": "c0ffee00-0000-4000-8000-000000000002"},
    )
    await assert_error(resp, 400, "AGENT.INVALID_REQUEST", "taskUuid")


async def test_callbackurl_header_is_used(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    resp = await client.post(
        MIGRATE.format(VM_1), json=body(), headers={**AUTH, "callbackurl": "http://127.0.0.1:9/cb"}
    )
    view = await resp.json()
    assert view["request"]["callbackUrl"] == "http://127.0.0.1:9/cb"


# -- bad input: each a clear 4xx --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(surprise=1), "surprise"),
        (body(migrateVm={"bandwidth": -5}), "migrateVm.bandwidth"),
        (body(migrateVm={"bandwidth": "100"}), "migrateVm.bandwidth"),
        (body(migrateVm={"downTime": 1.5}), "migrateVm.downTime"),
        (
            body(primaryStorageMigrateVm={"dstPrimaryStorageUuid": "not-a-uuid"}),
            "primaryStorageMigrateVm.dstPrimaryStorageUuid",
        ),
        (
            body(primaryStorageMigrateVm={"dstPrimaryStorageUuid": STORAGE_A, "strategy": "teleport"}),
            "primaryStorageMigrateVm.strategy",
        ),
        ({"migrateVm": {}}, "primaryStorageMigrateVm"),
        (body(volumes=[{"uuid": "v", "bogus": True}]), "volumes[0].bogus"),
        (body(callbackUrl="ftp://x"), "callbackUrl"),
        (body(timeout=0), "timeout"),
        (body(withDataVolumes=True), "withDataVolumes"),
    ],
)
async def test_invalid_bodies_name_the_field(
    aiohttp_client: Any, tmp_path: Path, payload: dict[str, Any], field: str
) -> None:
    client = await start(aiohttp_client, tmp_path)
    resp = await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)
    error = await assert_error(resp, 400, "AGENT.INVALID_REQUEST", field)
    assert field in error["description"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"null"])
async def test_non_object_bodies_are_400(aiohttp_client: Any, tmp_path: Path, raw: bytes) -> None:
    client = await start(aiohttp_client, tmp_path)
    resp = await client.post(
        MIGRATE.format(VM_1), data=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    await assert_error(resp, 400, "AGENT.INVALID_REQUEST", "<body>")


async def test_strategy_accepts_its_names(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    payload = body(primaryStorageMigrateVm={"dstPrimaryStorageUuid": STORAGE_A, "strategy": "auto-converge"})
    resp = await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)
    assert resp.status == 202


async def test_unknown_storage_uuid(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    payload = body(primaryStorageMigrateVm={"dstPrimaryStorageUuid": "0b0f1c3a-9999-4a4a-8b8b-000000000009"})
    resp = await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)
    await assert_error(resp, 400, "AGENT.STORAGE_NOT_FOUND", "primaryStorageMigrateVm.dstPrimaryStorageUuid")
    # This host named explicitly is the same as no host.
    from service_fakes import HOST_UUID

    payload["primaryStorageMigrateVm"]["dstHostUuid"] = HOST_UUID
    resp = await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)
    await assert_error(resp, 400, "AGENT.STORAGE_NOT_FOUND", "primaryStorageMigrateVm.dstPrimaryStorageUuid")


async def test_destination_paths_must_stay_inside_the_root(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    root_a = tmp_path / "rootA"
    (root_a / "escape").symlink_to(tmp_path / "rootB")
    cases = [
        (str(root_a / ".." / "rootB" / "x.qcow2"), 1),
        ("/etc/passwd", 0),
        (str(root_a / "escape" / "x.qcow2"), 0),
        (str(root_a), 0),
    ]
    for path, index in cases:
        volumes = [{"uuid": "ok", "dstInstallPath": str(root_a / "fine.qcow2")}] if index else []
        volumes.append({"uuid": "bad", "dstInstallPath": path})
        resp = await client.post(MIGRATE.format(VM_1), json=body(volumes=volumes), headers=AUTH)
        await assert_error(resp, 400, "AGENT.PATH_OUTSIDE_ROOT", f"volumes[{index}].dstInstallPath")
    good = body(volumes=[{"uuid": "v", "dstInstallPath": str(root_a / "sub" / "new.qcow2")}])
    assert (await client.post(MIGRATE.format(VM_1), json=good, headers=AUTH)).status == 202


async def test_other_host_needs_a_complete_dst_host(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    other = "aa" * 16
    psm = {"dstPrimaryStorageUuid": STORAGE_B, "dstHostUuid": other}
    resp = await client.post(MIGRATE.format(VM_1), json=body(primaryStorageMigrateVm=psm), headers=AUTH)
    await assert_error(resp, 400, "AGENT.INVALID_REQUEST", "dstHost")
    mismatched = body(
        primaryStorageMigrateVm=psm, dstHost={"uuid": "bb" * 16, "agentUrl": "http://127.0.0.1:1"}
    )
    resp = await client.post(MIGRATE.format(VM_1), json=mismatched, headers=AUTH)
    await assert_error(resp, 400, "AGENT.INVALID_REQUEST", "dstHost.uuid")
    # The destination's storage uuid is the destination agent's business, not checked here.
    remote = body(
        primaryStorageMigrateVm={**psm, "dstPrimaryStorageUuid": "0b0f1c3a-9999-4a4a-8b8b-000000000009"},
        dstHost={"uuid": other, "agentUrl": "http://127.0.0.1:1"},
    )
    assert (await client.post(MIGRATE.format(VM_1), json=remote, headers=AUTH)).status == 202


async def test_unknown_vm_is_404_and_bad_uuid_is_400(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    resp = await client.post(MIGRATE.format(UNKNOWN_VM), json=body(), headers=AUTH)
    await assert_error(resp, 404, "AGENT.NOT_FOUND", "vmUuid")
    resp = await client.post(MIGRATE.format("not-a-uuid"), json=body(), headers=AUTH)
    await assert_error(resp, 400, "AGENT.INVALID_REQUEST", "vmUuid")
    resp = await client.get(f"/v1/tasks/{UNKNOWN_VM}", headers=AUTH)
    await assert_error(resp, 404, "AGENT.NOT_FOUND", "taskUuid")
    resp = await client.post(f"/v1/tasks/{UNKNOWN_VM}/cancel", headers=AUTH)
    await assert_error(resp, 404, "AGENT.NOT_FOUND")
    resp = await client.get("/v1/tasks?state=NAPPING", headers=AUTH)
    await assert_error(resp, 400, "AGENT.INVALID_REQUEST", "state")


async def test_too_large_body_is_413(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, limits={"max_request_bytes": 2048})
    payload = body(userTags=["x" * 100] * 40)
    resp = await client.post(MIGRATE.format(VM_1), json=payload, headers=AUTH)
    await assert_error(resp, 413, "AGENT.PAYLOAD_TOO_LARGE")


async def test_unknown_endpoint_and_method_are_error_codes(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    await assert_error(await client.get("/v1/nothing", headers=AUTH), 404, "AGENT.NOT_FOUND")
    await assert_error(await client.delete("/v1/tasks", headers=AUTH), 405, "AGENT.METHOD_NOT_ALLOWED")


async def test_unexpected_errors_are_500_error_codes_and_logged(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(aiohttp_client, tmp_path, inventory=FakeInventory(broken=True))
    resp = await client.get("/v1/vms", headers=AUTH)
    error = await assert_error(resp, 500, "AGENT.INTERNAL")
    assert "exploded" not in error["description"]
    assert "inventory exploded" in caplog.text


async def test_stopping_agent_answers_503(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    client.app[SERVICE].stopping.set()
    await assert_error(await client.get("/v1/health"), 503, "AGENT.STOPPING")
    await assert_error(
        await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH), 503, "AGENT.STOPPING"
    )


# -- cancel, retune, queueing -----------------------------------------------------------------------------


async def test_cancel_before_start_via_the_api(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(aiohttp_client, tmp_path, script, limits={"outgoing_migrations": 1})
    first = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    queued = await (await client.post(MIGRATE.format(VM_2), json=body(), headers=AUTH)).json()
    await wait_state(client, first["taskUuid"], "COPYING")
    assert (await wait_state(client, queued["taskUuid"], "QUEUED"))["state"] == "QUEUED"
    for _ in range(2):
        resp = await client.post(f"/v1/tasks/{queued['taskUuid']}/cancel", headers=AUTH)
        assert resp.status == 202
        view = await resp.json()
        assert [s["state"] for s in view["states"]] == ["PENDING", "QUEUED", "CANCELLED"]
        assert view["queue"] is None
        assert view["error"]["code"] == "AGENT.CANCELLED"
    script.gate.set()  # type: ignore[union-attr]
    await wait_state(client, first["taskUuid"], "SUCCEEDED")
    assert [vm for vm, _ in script.calls] == [VM_1]


async def test_cancel_running_and_retune(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(aiohttp_client, tmp_path, script)
    task = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    url = f"/v1/tasks/{task['taskUuid']}"
    await wait_state(client, task["taskUuid"], "COPYING")
    resp = await client.patch(url, json={"bandwidth": 5, "downTime": 1000}, headers=AUTH)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["tuning"] == {"bandwidth": 5, "downTime": 1000}
    limits = answer["details"]["limits"]  # no stream runs in the fake engine: what the next ones start with
    assert limits["effective"] is None and limits["budgetBytesPerSecond"] == 5 * 1024 * 1024
    await assert_error(
        await client.patch(url, json={}, headers=AUTH), 400, "AGENT.INVALID_REQUEST", "bandwidth"
    )
    await assert_error(
        await client.patch(url, json={"bandwidth": -1}, headers=AUTH),
        400,
        "AGENT.INVALID_REQUEST",
        "bandwidth",
    )
    resp = await client.post(f"{url}/cancel", headers=AUTH)
    assert resp.status == 202
    view = await wait_state(client, task["taskUuid"], "CANCELLED")
    assert [s["state"] for s in view["states"]][-2:] == ["CANCELLING", "CANCELLED"]
    await assert_error(await client.patch(url, json={"bandwidth": 5}, headers=AUTH), 409, "AGENT.CONFLICT")
    assert (await client.post(f"{url}/cancel", headers=AUTH)).status == 202


async def test_a_retune_answers_with_the_limits_qemu_reports_after_it(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    script = Script(gate=asyncio.Event(), streams=FakeStreams())
    client = await start(aiohttp_client, tmp_path, script)
    task = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    await wait_state(client, task["taskUuid"], "COPYING")
    resp = await client.patch(
        f"/v1/tasks/{task['taskUuid']}", json={"bandwidth": 0, "downTime": 700}, headers=AUTH
    )
    assert resp.status == 200
    limits = (await resp.json())["details"]["limits"]
    assert limits["asked"]["bandwidthBytesPerSecond"] is None and limits["budgetBytesPerSecond"] is None
    effective = limits["effective"]
    assert effective["disks"] == {"vda": {"bytesPerSecond": 0}, "vdb": {"bytesPerSecond": 0}}
    assert effective["migrationBytesPerSecond"] is None and effective["downtimeLimitMs"] == 700
    script.gate.set()  # type: ignore[union-attr]
    await wait_state(client, task["taskUuid"], "SUCCEEDED")


async def test_a_retune_qemu_refuses_is_503_and_one_after_the_streams_is_409(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    streams = FakeStreams()
    streams.fail = {"vdb": 2}
    script = Script(gate=asyncio.Event(), streams=streams, switch_gate=asyncio.Event())
    client = await start(aiohttp_client, tmp_path, script)
    task = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    url = f"/v1/tasks/{task['taskUuid']}"
    await wait_state(client, task["taskUuid"], "COPYING")
    error = await assert_error(
        await client.patch(url, json={"bandwidth": 0}, headers=AUTH),
        503,
        "AGENT.LIMITS_NOT_APPLIED",
        "bandwidth",
    )
    assert "disk vdb to 0" in error["description"]
    limits = (await (await client.get(url, headers=AUTH)).json())["details"]["limits"]
    assert limits["effective"]["disks"]["vdb"] == {"bytesPerSecond": 1024 * 1024}  # what QEMU still runs
    assert limits["failedChanges"] == 2 and limits["unapplied"][0]["knob"] == "disk vdb"
    script.gate.set()  # type: ignore[union-attr]
    await wait_state(client, task["taskUuid"], "SWITCHING")
    await assert_error(
        await client.patch(url, json={"bandwidth": 5}, headers=AUTH), 409, "AGENT.LIMITS_TOO_LATE"
    )
    script.switch_gate.set()  # type: ignore[union-attr]
    await wait_state(client, task["taskUuid"], "SUCCEEDED")


async def test_outgoing_limit_queues_over_http(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(aiohttp_client, tmp_path, script, limits={"outgoing_migrations": 1})
    first = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    second = await client.post(MIGRATE.format(VM_2), json=body(), headers=AUTH)
    assert second.status == 202
    second_view = await second.json()
    await wait_state(client, first["taskUuid"], "COPYING")
    await asyncio.sleep(0.05)
    queued = await wait_state(client, second_view["taskUuid"], "QUEUED")
    assert queued["queue"]["position"] == 1 and "limits.outgoing_migrations" in queued["queue"]["reason"]
    script.gate.set()  # type: ignore[union-attr]
    await wait_state(client, second_view["taskUuid"], "SUCCEEDED")


async def test_the_host_budget_is_shown_and_changed_live(aiohttp_client: Any, tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(
        aiohttp_client, tmp_path, script, limits={"outgoing_migrations": 1, "host_bandwidth": 40}
    )
    budget = await (await client.get("/v1/host/budget", headers=AUTH)).json()
    assert budget["outgoing"]["bandwidth"] == 40 and budget["outgoing"]["migrations"] == 1
    assert budget["outgoing"]["plannedBytesPerSecond"] < 40 * 1024 * 1024
    first = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    second = await (await client.post(MIGRATE.format(VM_2), json=body(), headers=AUTH)).json()
    await wait_state(client, second["taskUuid"], "QUEUED")
    # One more move at once: the queued task starts without waiting for the first.
    resp = await client.patch("/v1/host/budget", json={"outgoingMigrations": 2, "outgoing": 0}, headers=AUTH)
    assert resp.status == 200
    changed = await resp.json()
    assert changed["outgoing"]["migrations"] == 2 and changed["outgoing"]["bandwidth"] is None
    await wait_state(client, second["taskUuid"], "COPYING")
    await assert_error(
        await client.patch("/v1/host/budget", json={}, headers=AUTH), 400, "AGENT.INVALID_REQUEST"
    )
    await assert_error(
        await client.patch("/v1/host/budget", json={"outgoing": -1}, headers=AUTH),
        400,
        "AGENT.INVALID_REQUEST",
    )
    script.gate.set()  # type: ignore[union-attr]
    for task in (first, second):
        await wait_state(client, task["taskUuid"], "SUCCEEDED")


# -- host, vms, metrics, openapi --------------------------------------------------------------------------


async def test_host_facts(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(
        aiohttp_client,
        tmp_path,
        storage=[
            {"uuid": STORAGE_A, "path": str(tmp_path / "rootA")},
            {"uuid": STORAGE_B, "path": str(tmp_path / "missing")},
        ],
    )
    resp = await client.get("/v1/host", headers=AUTH)
    assert resp.status == 200
    host = models.HostView.model_validate(await resp.json())
    assert host.memory["totalBytes"] > 0 and host.cpu["count"] >= 1
    by_uuid = {root.uuid: root for root in host.storage}
    assert by_uuid[STORAGE_A].totalBytes and by_uuid[STORAGE_A].freeBytes is not None
    assert by_uuid[STORAGE_B].totalBytes is None and by_uuid[STORAGE_B].error


async def test_vms_from_the_inventory(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    vms = await (await client.get("/v1/vms", headers=AUTH)).json()
    assert {vm["uuid"] for vm in vms["vms"]} == {VM_1, VM_2}
    vm = await (await client.get(f"/v1/vms/{VM_1}", headers=AUTH)).json()
    assert vm["disks"][0]["chain"]
    await assert_error(await client.get(f"/v1/vms/{UNKNOWN_VM}", headers=AUTH), 404, "AGENT.NOT_FOUND")


async def test_without_libvirt_the_vm_endpoints_say_so(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path, inventory=None)
    await assert_error(await client.get("/v1/vms", headers=AUTH), 502, "AGENT.LIBVIRT_UNAVAILABLE")
    # Without an inventory the VM cannot be checked, so the request goes to the engine.
    assert (await client.post(MIGRATE.format(UNKNOWN_VM), json=body(), headers=AUTH)).status == 202


async def test_metrics(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    task = await (await client.post(MIGRATE.format(VM_1), json=body(), headers=AUTH)).json()
    await wait_state(client, task["taskUuid"], "SUCCEEDED")
    await asyncio.sleep(0.05)
    resp = await client.get("/metrics", headers=AUTH)
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert 'kvm_agent_tasks{state="SUCCEEDED"} 1.0' in text
    assert "kvm_agent_migration_bytes_total 2500.0" in text
    assert 'kvm_agent_migration_duration_seconds_count{outcome="succeeded"} 1.0' in text
    assert "kvm_agent_migration_downtime_seconds_count 1.0" in text
    assert "kvm_agent_report_failures" in text


async def test_openapi_document(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await start(aiohttp_client, tmp_path)
    doc = await (await client.get("/v1/openapi.json", headers=AUTH)).json()
    assert doc["openapi"].startswith("3.1")
    post = doc["paths"]["/v1/vms/{vmUuid}/storage-migrations"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MigrationRequest"
    }
    assert {"202", "400", "401", "404", "409", "413"} <= set(post["responses"])
    schemas = doc["components"]["schemas"]
    assert {
        "MigrationRequest",
        "PrimaryStorageMigrateVm",
        "TaskView",
        "ErrorCode",
        "Tuning",
        "CallbackBody",
    } <= set(schemas)
    assert doc["paths"]["/v1/health"]["get"]["security"] == []
    text = await (await client.get("/v1/openapi.json", headers=AUTH)).text()
    assert "$defs" not in text
