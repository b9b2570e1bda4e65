"""Host evacuations over the HTTP API with the fake engine (issue 24): one operation, each VM a task of its
own handed over round-robin within each destination's incoming limit, one progress, cancel (finish or roll
back), bad input named by its field, and the journal across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from service_fakes import (
    AUTH,
    HOST_UUID,
    TOKEN,
    UNKNOWN_VM,
    VM_1,
    VM_2,
    VM_3,
    VM_4,
    VM_5,
    Client,
    FakeFactory,
    FakeInventory,
    Script,
    eventually,
    make_config,
)

from agent.api import models
from agent.api.access import Role
from agent.api.app import make_app
from agent.api.routes import ROUTES

EVACUATIONS = "/v1/host/evacuations"
HOST_B = "22222222-3333-4444-8555-666666666601"
HOST_C = "22222222-3333-4444-8555-666666666602"
DST_STORAGE = "0b0f1c3a-3333-4a4a-8b8b-000000000003"
ALL_VMS = (VM_1, VM_2, VM_3, VM_4, VM_5)


def destination(host: str, incoming: int = 1, **dst_host: Any) -> dict[str, Any]:
    return {
        "dstHost": {"uuid": host, "agentUrl": f"http://127.0.0.1:1/{host[-2:]}", **dst_host},
        "dstPrimaryStorageUuid": DST_STORAGE,
        "incomingMigrations": incoming,
    }


async def start(tmp_path: Path, script: Script, **config: Any) -> Client:
    config.setdefault("limits", {"outgoing_migrations": 8})
    app = make_app(
        make_config(tmp_path, **config),
        token=TOKEN,
        engine_factory=FakeFactory(script),
        inventory=FakeInventory(*ALL_VMS),
    )
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def view_of(client: Client, uuid: str) -> dict[str, Any]:
    resp = await client.get(f"{EVACUATIONS}/{uuid}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    view: dict[str, Any] = await resp.json()
    models.EvacuationView.model_validate(view)
    return view


async def until(client: Client, uuid: str, check: Any, within: float = 5.0) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal seen
        seen = await view_of(client, uuid)
        return bool(check(seen))

    await eventually(reached, within=within)
    return seen


async def test_each_vm_is_a_task_of_its_own_round_robin_within_each_destinations_limit(
    tmp_path: Path,
) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(tmp_path, script)
    try:
        resp = await client.post(
            EVACUATIONS,
            json={
                "vms": list(ALL_VMS),
                "destinations": [destination(HOST_B), destination(HOST_C)],
                "migrateVm": {"bandwidth": 30},
                "priority": 20,
            },
            headers=AUTH,
        )
        assert resp.status == 202, await resp.text()
        created = await resp.json()
        uuid = created["evacuationUuid"]
        assert resp.headers["Location"] == f"{EVACUATIONS}/{uuid}"
        # One move into each destination (incomingMigrations 1), the other three wait.
        view = await until(client, uuid, lambda v: v["progress"]["vmsRunning"] == 2)
        await asyncio.sleep(0.2)  # nothing more is handed over while both destinations are full
        view = await view_of(client, uuid)
        states = [vm["state"] for vm in view["vms"]]
        assert states[2:] == ["WAITING"] * 3 and all(s not in ("WAITING",) for s in states[:2]), states
        assert [vm["destination"]["hostUuid"] for vm in view["vms"][:2]] == [HOST_B, HOST_C]
        assert [d["running"] for d in view["destinations"]] == [1, 1]
        assert view["state"] == "RUNNING" and view["progress"]["vmsDone"] == 0
        # Each VM is an ordinary task, with the evacuation's settings.
        first = view["vms"][0]
        task = await (await client.get(f"/v1/tasks/{first['taskUuid']}", headers=AUTH)).json()
        assert task["vmUuid"] == VM_1 and task["request"]["priority"] == 20
        assert task["tuning"]["bandwidth"] == 30
        assert task["request"]["primaryStorageMigrateVm"]["dstHostUuid"] == HOST_B
        assert task["request"]["primaryStorageMigrateVm"]["dstPrimaryStorageUuid"] == DST_STORAGE

        script.gate.set()  # type: ignore[union-attr]
        done = await until(client, uuid, lambda v: v["state"] != "RUNNING")
        assert done["state"] == "SUCCEEDED", done
        assert [vm["verdict"] for vm in done["vms"]] == [True] * 5
        assert {vm["vmUuid"] for vm in done["vms"]} == set(ALL_VMS)
        progress = done["progress"]
        assert progress["vmsDone"] == progress["vmsSucceeded"] == 5 and progress["percent"] == 100.0
        assert progress["bytesDone"] == progress["bytesTotal"] > 0 and progress["etaSeconds"] is None
        assert {vm["destination"]["hostUuid"] for vm in done["vms"]} == {HOST_B, HOST_C}
        listed = await (await client.get(EVACUATIONS, headers=AUTH)).json()
        models.EvacuationList.model_validate(listed)
        assert [e["evacuationUuid"] for e in listed["evacuations"]] == [uuid]
    finally:
        await client.close()


async def test_progress_counts_bytes_and_an_eta_while_it_runs(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event(), item_bytes=10_000)
    client = await start(tmp_path, script)
    try:
        created = await (
            await client.post(
                EVACUATIONS,
                json={"vms": [VM_1, VM_2], "destinations": [destination(HOST_B, 2)]},
                headers=AUTH,
            )
        ).json()
        view = await until(
            client, created["evacuationUuid"], lambda v: all(vm["bytesDone"] > 0 for vm in v["vms"])
        )
        progress = view["progress"]
        assert 0 < progress["bytesDone"] < progress["bytesTotal"] and progress["vmsDone"] == 0
        assert progress["bytesTotal"] == sum(vm["bytesTotal"] for vm in view["vms"])
        # The fake engine's rate is high: the ETA may round to 0.0 s, but it is given while the VMs move.
        assert progress["etaSeconds"] is not None and progress["etaSeconds"] >= 0
        assert progress["bytesPerSecond"] is not None and progress["bytesPerSecond"] > 0
        script.gate.set()  # type: ignore[union-attr]
        await until(client, created["evacuationUuid"], lambda v: v["state"] == "SUCCEEDED")
    finally:
        await client.close()


async def test_cancel_stops_the_waiting_and_lets_the_running_finish(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    # Two moves into hostB at once, but one outgoing slot: the second is QUEUED in the task manager.
    client = await start(tmp_path, script, limits={"outgoing_migrations": 1})
    try:
        created = await (
            await client.post(
                EVACUATIONS,
                json={"vms": [VM_1, VM_2, VM_3], "destinations": [destination(HOST_B, 2)]},
                headers=AUTH,
            )
        ).json()
        uuid = created["evacuationUuid"]
        await until(
            client, uuid, lambda v: [vm["state"] for vm in v["vms"]] == ["COPYING", "QUEUED", "WAITING"]
        )
        resp = await client.post(f"{EVACUATIONS}/{uuid}/cancel", headers=AUTH)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["state"] == "CANCELLING"
        view = await until(client, uuid, lambda v: [vm["state"] for vm in v["vms"]][1:] == ["CANCELLED"] * 2)
        assert view["vms"][0]["state"] == "COPYING" and view["vms"][2]["taskUuid"] is None
        script.gate.set()  # type: ignore[union-attr]
        done = await until(client, uuid, lambda v: v["state"] not in ("RUNNING", "CANCELLING"))
        assert done["state"] == "CANCELLED"
        assert [vm["verdict"] for vm in done["vms"]] == [True, False, False]
        assert done["vms"][0]["state"] == "SUCCEEDED"
        # Cancelling again changes nothing.
        again = await (await client.post(f"{EVACUATIONS}/{uuid}/cancel", headers=AUTH)).json()
        assert again["state"] == "CANCELLED"
    finally:
        await client.close()


async def test_cancel_with_rollback_cancels_the_running_tasks(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(tmp_path, script)
    try:
        created = await (
            await client.post(
                EVACUATIONS,
                json={"vms": [VM_1, VM_2], "destinations": [destination(HOST_B, 1)]},
                headers=AUTH,
            )
        ).json()
        uuid = created["evacuationUuid"]
        await until(client, uuid, lambda v: v["vms"][0]["state"] == "COPYING")
        bad = await client.post(f"{EVACUATIONS}/{uuid}/cancel", json={"running": "abandon"}, headers=AUTH)
        assert bad.status == 400 and (await bad.json())["field"] == "running"
        resp = await client.post(f"{EVACUATIONS}/{uuid}/cancel", json={"running": "rollback"}, headers=AUTH)
        assert resp.status == 200
        done = await until(client, uuid, lambda v: v["state"] == "CANCELLED")
        assert [vm["state"] for vm in done["vms"]] == ["CANCELLED", "CANCELLED"]
        assert script.cancelled == [False]  # the running engine was cancelled (not detached): it rolls back
    finally:
        script.gate.set()  # type: ignore[union-attr]
        await client.close()


async def test_all_takes_every_running_vm_and_a_vm_may_have_its_own_destination(tmp_path: Path) -> None:
    script = Script()
    client = await start(tmp_path, script)
    try:
        created = await (
            await client.post(
                EVACUATIONS, json={"vms": "all", "destinations": [destination(HOST_B, 5)]}, headers=AUTH
            )
        ).json()
        done = await until(client, created["evacuationUuid"], lambda v: v["state"] != "RUNNING")
        assert done["state"] == "SUCCEEDED" and {vm["vmUuid"] for vm in done["vms"]} == set(ALL_VMS)

        own = await (
            await client.post(
                EVACUATIONS,
                json={
                    "vms": [{"vmUuid": VM_1, "destination": destination(HOST_C)}, VM_2],
                    "destinations": [destination(HOST_B)],
                },
                headers=AUTH,
            )
        ).json()
        done = await until(client, own["evacuationUuid"], lambda v: v["state"] != "RUNNING")
        assert [vm["destination"]["hostUuid"] for vm in done["vms"]] == [HOST_C, HOST_B]
    finally:
        await client.close()


async def test_bad_input_is_named_by_its_field(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(tmp_path, script)

    async def refused(payload: dict[str, Any], status: int, code: str, field: str) -> None:
        resp = await client.post(EVACUATIONS, json=payload, headers=AUTH)
        assert resp.status == status, await resp.text()
        error = await resp.json()
        models.ErrorCode.model_validate(error)
        assert (error["code"], error.get("field")) == (code, field), error

    try:
        dst = [destination(HOST_B)]
        await refused({"vms": [VM_1]}, 400, "AGENT.INVALID_REQUEST", "destinations")
        await refused({"destinations": dst}, 400, "AGENT.INVALID_REQUEST", "vms")
        await refused({"vms": [], "destinations": dst}, 400, "AGENT.INVALID_REQUEST", "vms")
        await refused({"vms": "some", "destinations": dst}, 400, "AGENT.INVALID_REQUEST", "vms")
        await refused({"vms": [VM_1, UNKNOWN_VM], "destinations": dst}, 404, "AGENT.VM_NOT_FOUND", "vms[1]")
        await refused({"vms": [VM_1, VM_1], "destinations": dst}, 400, "AGENT.INVALID_REQUEST", "vms[1]")
        await refused(
            {"vms": [VM_1], "destinations": [destination(HOST_UUID)]},
            400,
            "AGENT.INVALID_REQUEST",
            "destinations[0].dstHost.uuid",
        )
        no_url = destination(HOST_B)
        del no_url["dstHost"]["agentUrl"]
        await refused(
            {"vms": [VM_1], "destinations": [no_url]},
            400,
            "AGENT.INVALID_REQUEST",
            "destinations[0].dstHost.agentUrl",
        )
        await refused(
            {"vms": [VM_1], "destinations": [{**destination(HOST_B), "incomingMigrations": 0}]},
            400,
            "AGENT.INVALID_REQUEST",
            "destinations[0].incomingMigrations",
        )
        await refused(
            {"vms": [VM_1], "destinations": dst, "migrateVm": {"bandwidth": -1}},
            400,
            "AGENT.INVALID_REQUEST",
            "migrateVm.bandwidth",
        )
        await refused({"vms": [VM_1], "destinations": dst, "typo": 1}, 400, "AGENT.INVALID_REQUEST", "typo")
        # A VM that is moving already.
        first = await (
            await client.post(EVACUATIONS, json={"vms": [VM_1], "destinations": dst}, headers=AUTH)
        ).json()
        await until(client, first["evacuationUuid"], lambda v: v["vms"][0]["state"] == "COPYING")
        await refused({"vms": [VM_2, VM_1], "destinations": dst}, 409, "AGENT.CONFLICT", "vms[1]")
        # The same evacuationUuid: the same evacuation; with another body: 409.
        same = {"evacuationUuid": first["evacuationUuid"], "vms": [VM_1], "destinations": dst}
        again = await client.post(EVACUATIONS, json=same, headers=AUTH)
        assert again.status == 202 and (await again.json())["evacuationUuid"] == first["evacuationUuid"]
        await refused({**same, "priority": 50}, 409, "AGENT.CONFLICT", "evacuationUuid")
        missing = await client.get(f"{EVACUATIONS}/{UNKNOWN_VM}", headers=AUTH)
        assert missing.status == 404 and (await missing.json())["field"] == "evacuationUuid"
        # The destination's token never shows.
        secret = destination(HOST_C, token="dst-secret-token")
        made = await client.post(EVACUATIONS, json={"vms": [VM_3], "destinations": [secret]}, headers=AUTH)
        assert made.status == 202 and "dst-secret-token" not in await made.text()
    finally:
        script.gate.set()  # type: ignore[union-attr]
        await client.close()


def test_evacuations_are_for_the_management_plane_only() -> None:
    paths = [r for r in ROUTES if r.path.startswith(EVACUATIONS)]
    assert len(paths) == 4 and all(r.role is Role.MANAGEMENT for r in paths)


async def test_an_evacuation_goes_on_after_a_restart(tmp_path: Path) -> None:
    script = Script(gate=asyncio.Event())
    client = await start(tmp_path, script)
    created = await (
        await client.post(
            EVACUATIONS,
            json={"vms": [VM_1, VM_2, VM_3], "destinations": [destination(HOST_B, 1)]},
            headers=AUTH,
        )
    ).json()
    uuid = created["evacuationUuid"]
    running = await until(client, uuid, lambda v: v["vms"][0]["state"] == "COPYING")
    await client.close()  # detaches: the running task and the evacuation stay unfinished in the journals

    script2 = Script()
    client2 = await start(tmp_path, script2)
    try:
        view = await view_of(client2, uuid)
        assert view["state"] == "RUNNING" and view["vms"][0]["taskUuid"] == running["vms"][0]["taskUuid"]
        done = await until(client2, uuid, lambda v: v["state"] != "RUNNING")
        assert done["state"] == "SUCCEEDED" and [vm["verdict"] for vm in done["vms"]] == [True] * 3
        assert script2.calls[0] == (VM_1, True)  # the first VM's task resumed, the others started afresh
        assert sorted(script2.calls[1:]) == [(VM_2, False), (VM_3, False)]
    finally:
        script.gate.set()  # type: ignore[union-attr]
        await client2.close()
