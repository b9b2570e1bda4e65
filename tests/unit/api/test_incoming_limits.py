"""Limits of the destination side (issue 22): incoming migrations open at once, layer exports open at once
(429 with Retry-After when full), and the space a prepare needs reserved until its migration settles."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hostile_support import Destination, MiB, cluster, start_destination
from service_fakes import STORAGE_B, VM_1

from agent.client import ApiError

__all__ = ["cluster"]


@pytest.fixture
async def dst(tmp_path: Path, cluster: Path, unused_tcp_port: int) -> AsyncIterator[Destination]:
    limits = {"incoming_migrations": 2, "incoming_exports": 1}
    async for destination in start_destination(tmp_path, cluster, unused_tcp_port, limits=limits):
        yield destination


def layer(name: str) -> dict[str, object]:
    return {"name": name, "format": "qcow2", "virtualSize": 16 * MiB, "actualSize": MiB}


def spec(name: str, *, estimated: int = MiB, layers: int = 0) -> dict[str, object]:
    return {
        "migrationId": str(uuid.uuid4()),
        "vmUuid": VM_1,
        "dstPrimaryStorageUuid": STORAGE_B,
        "disks": [
            {
                "target": "vda",
                "volumeUuid": "v1",
                "top": f"{name}.qcow2",
                "format": "qcow2",
                "virtualSize": 16 * MiB,
                "estimatedBytes": estimated,
                "flatten": layers == 0,
                "layers": [
                    {
                        "name": f"{name}-{i}.qcow2",
                        "format": "qcow2",
                        "virtualSize": 16 * MiB,
                        "actualSize": MiB,
                    }
                    for i in range(layers)
                ],
            }
        ],
    }


async def prepare(dst: Destination, body: dict[str, object]) -> dict[str, object]:
    async with dst.client("agent-a") as client:
        answer: dict[str, object] = await client.request("POST", "v1", "incoming-migrations", json_body=body)
        return answer


async def test_open_incoming_migrations_are_capped(dst: Destination) -> None:
    first, second = spec("a"), spec("b")
    await prepare(dst, first)
    await prepare(dst, second)
    before = (dst.files(), dst.records())
    with pytest.raises(ApiError) as full:
        await prepare(dst, spec("c"))
    assert full.value.status == 429 and full.value.error["code"] == "AGENT.BUSY"
    assert (dst.files(), dst.records()) == before
    async with dst.client("agent-a") as client:
        await client.request("DELETE", "v1", "incoming-migrations", str(first["migrationId"]))
    await prepare(dst, spec("c"))  # a slot came free


async def test_open_exports_are_capped(dst: Destination) -> None:
    body = spec("chain", layers=2)
    await prepare(dst, body)
    migration_id = str(body["migrationId"])
    async with dst.client("agent-a") as client:
        try:
            await client.request(
                "POST",
                "v1",
                "incoming-migrations",
                migration_id,
                "layers",
                json_body={"target": "vda", "index": 0},
            )
            with pytest.raises(ApiError) as full:
                await client.request(
                    "POST",
                    "v1",
                    "incoming-migrations",
                    migration_id,
                    "layers",
                    json_body={"target": "vda", "index": 1},
                )
            assert full.value.status == 429 and full.value.error["code"] == "AGENT.BUSY"
        finally:
            await client.request("DELETE", "v1", "incoming-migrations", migration_id)
    assert dst.files() == {}


async def test_space_is_reserved_until_the_migration_settles(dst: Destination) -> None:
    free = shutil.disk_usage(dst.root).free
    big = int(free * 0.6 / 1.1)
    first = spec("a", estimated=big)
    await prepare(dst, first)
    with pytest.raises(ApiError) as refused:
        await prepare(dst, spec("b", estimated=big))
    assert refused.value.status == 409 and refused.value.error["code"] == "AGENT.NO_SPACE"
    assert "reserved by moves in flight" in refused.value.error["description"]
    async with dst.client("agent-a") as client:
        await client.request("DELETE", "v1", "incoming-migrations", str(first["migrationId"]))
    await prepare(dst, spec("b", estimated=big))
