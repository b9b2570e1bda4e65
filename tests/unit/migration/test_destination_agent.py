"""DestinationAgent: each call goes to its agent-to-agent path with its body, and a refusal becomes this
agent's error with the destination's code (the paths are written nowhere else in agent/)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import pytest
from service_fakes import one_disk_spec

from agent.client import AgentClient, ApiError
from agent.errors import Code, MigrationFailed, NotFound
from agent.migration.peer.client import DestinationAgent

MIGRATION = "5a1d3c9e-0b7f-4e2a-9c61-2f8d4b7a0e13"
SPEC = one_disk_spec(MIGRATION, "5a1d3c9e-0b7f-4e2a-9c61-2f8d4b7a0e14")
AGENT = Path(__file__).resolve().parents[3] / "agent"


class RecordingClient:
    def __init__(self, error: ApiError | None = None) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.error = error

    async def request(self, method: str, *segments: str, json_body: Any = None) -> Any:
        self.calls.append((method, "/" + "/".join(segments), json_body))
        if self.error is not None:
            raise self.error
        if method == "POST" and segments == ("v1", "incoming-migrations"):
            return self.prepared
        return {"ok": True}

    prepared: Any = {
        "migrationId": "x",
        "state": "prepared",
        "disks": [{"target": "vda", "top": "/dst/top.qcow2", "layers": ["/dst/base.qcow2"]}],
        "libvirtUri": "qemu+tls://hostB/system",
        "migrationUri": "tcp://10.0.0.2",
        "fromANewerAgent": 1,
    }


def _agent(client: RecordingClient) -> DestinationAgent:
    return DestinationAgent(cast(AgentClient, client))


async def test_every_call_goes_to_its_path() -> None:
    client = RecordingClient()
    agent = _agent(client)
    ref = {"target": "vda", "index": 0}
    await agent.offer()
    prepared = await agent.prepare(SPEC)
    await agent.open_layer(MIGRATION, ref)
    await agent.finish_layer(MIGRATION, ref, {"sha256": "ab"})
    await agent.define(MIGRATION, "<domain/>")
    await agent.commit(MIGRATION)
    await agent.abort(MIGRATION)
    await agent.vm(MIGRATION)
    base = "/v1/incoming-migrations"
    assert client.calls == [
        ("GET", base, None),
        ("POST", base, SPEC.model_dump()),
        ("POST", f"{base}/{MIGRATION}/layers", ref),
        ("POST", f"{base}/{MIGRATION}/layers/finish", {**ref, "digest": {"sha256": "ab"}}),
        ("POST", f"{base}/{MIGRATION}/define", {"xml": "<domain/>"}),
        ("POST", f"{base}/{MIGRATION}/commit", {}),
        ("DELETE", f"{base}/{MIGRATION}", None),
        ("GET", f"{base}/{MIGRATION}/vm", None),
    ]
    assert prepared.tops() == {"vda": "/dst/top.qcow2"}
    assert prepared.disk("vda").layers == ("/dst/base.qcow2",)


async def test_an_answer_to_prepare_that_is_not_understood_fails_the_move() -> None:
    client = RecordingClient()
    client.prepared = {"migrationId": "x", "disks": "not a list"}
    with pytest.raises(MigrationFailed) as caught:
        await _agent(client).prepare(SPEC)
    assert caught.value.code is Code.PEER_ERROR
    client.prepared = {**RecordingClient.prepared, "disks": []}  # a disk of the spec left out
    prepared = await _agent(client).prepare(SPEC)
    with pytest.raises(MigrationFailed) as caught:
        prepared.disk("vda")
    assert caught.value.code is Code.PEER_ERROR and "names no disk vda" in caught.value.description


async def test_a_refusal_carries_the_destinations_code() -> None:
    refused = ApiError({"code": "AGENT.TARGET_EXISTS", "description": "exists", "field": "volumes[0]"}, 409)
    with pytest.raises(MigrationFailed) as caught:
        await _agent(RecordingClient(refused)).prepare(SPEC)
    assert caught.value.code is Code.TARGET_EXISTS
    assert caught.value.field == "volumes[0]"
    unknown = ApiError({"code": "AGENT.FROM_A_NEWER_AGENT", "description": "?"}, 500)
    with pytest.raises(MigrationFailed) as caught:
        await _agent(RecordingClient(unknown)).commit(MIGRATION)
    assert caught.value.code is Code.PEER_ERROR
    with pytest.raises(NotFound):
        await _agent(RecordingClient(ApiError({"code": "AGENT.NOT_FOUND"}, 404))).abort(MIGRATION)


def test_no_other_module_writes_the_agent_to_agent_paths() -> None:
    writers = sorted(
        str(path.relative_to(AGENT))
        for path in AGENT.rglob("*.py")
        if re.search(r"[\"']incoming-migrations[\"']", path.read_text())
    )
    assert writers == ["migration/peer/client.py"]
