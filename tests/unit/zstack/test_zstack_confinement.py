"""The ZStack dialect hands qemu-img and its HTTP client only confined, parsed paths and addresses (issue 22):
an ``nbd:`` install path that resolved inside a root made qemu-img connect out (a port scanner), and a
management address with a port or a fragment made the agent call any port. A listener on loopback counts
the connections either would make."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from service_fakes import VM_1, VM_2
from test_zstack_api import (
    FakeManagementServer,
    answered,
    blk_body,
    migrate_body,
    mn,
    send,
    start_agent,
    zs_uuid,
)

__all__ = ["mn"]


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[str]]]:
    """A port on loopback and the connections it received."""
    seen: list[str] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append("connection")
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def test_an_nbd_install_path_never_reaches_qemu_img(
    tmp_path: Path, mn: FakeManagementServer, listener: tuple[int, list[str]]
) -> None:
    port, seen = listener
    root = tmp_path / "rootA"
    evil = f"nbd:127.0.0.1:{port}:exportname=" + "/.." * 40 + str(root / "x.qcow2")
    client = await start_agent(tmp_path)
    try:
        task_uuid = zs_uuid()
        await send(
            client, "/vm/blklivemigration", blk_body(VM_1, "/o", evil, api="a", name="n"), task_uuid, mn
        )
        error = (await answered(mn, task_uuid)).body["error"]
        assert error.startswith("AGENT.INVALID_REQUEST: ") and "newVolume.installPath" in error, error
        await asyncio.sleep(0.2)
        assert seen == []
    finally:
        await client.close()


@pytest.mark.parametrize("shape", ["127.0.0.1:{port}#", "127.0.0.1:{port}/", "user@127.0.0.1:{port}?"])
async def test_a_destination_address_is_an_address(
    tmp_path: Path, mn: FakeManagementServer, listener: tuple[int, list[str]], shape: str
) -> None:
    port, seen = listener
    client = await start_agent(tmp_path)
    try:
        task_uuid = zs_uuid()
        body = migrate_body(VM_2, {"/a.qcow2": "/srv/b.qcow2"}, api="x", name="y")
        body["destHostManagementIp"] = shape.format(port=port)
        await send(client, "/vm/migrate", body, task_uuid, mn)
        error = (await answered(mn, task_uuid)).body["error"]
        assert error.startswith("AGENT.INVALID_REQUEST: ") and "destHostManagementIp" in error, error
        await asyncio.sleep(0.2)
        assert seen == []
    finally:
        await client.close()
