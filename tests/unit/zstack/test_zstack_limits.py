"""What ZStack commands can make the agent keep (issue 22): open commands are capped (429 with Retry-After
beyond ``[zstack] max_open_commands``), records in all are capped (the oldest answered go first), and the
callback URL goes only to the management server that asked or the configured networks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service_fakes import VM_1, Script
from test_zstack_api import FakeManagementServer, blk_body, mn, qcow2, send, start_agent, zs_uuid

__all__ = ["mn"]


async def test_open_commands_are_capped(tmp_path: Path, mn: FakeManagementServer) -> None:
    gate = asyncio.Event()
    client = await start_agent(
        tmp_path,
        Script(gate=gate),
        zstack={"enabled": True, "allowed_networks": ["127.0.0.0/8"], "max_open_commands": 2},
    )
    try:
        for i in range(2):
            target = qcow2(tmp_path / "rootA" / f"t{i}.qcow2")
            body = blk_body(VM_1, f"/o{i}.qcow2", target, api="a", name="n")
            await send(client, "/vm/blklivemigration", body, zs_uuid(), mn)
        target = qcow2(tmp_path / "rootA" / "t2.qcow2")
        resp = await client.post(
            "/vm/blklivemigration",
            json=blk_body(VM_1, "/o2.qcow2", target, api="a", name="n"),
            headers={"taskuuid": zs_uuid(), "callbackurl": mn.url(mn.CALLBACK)},
        )
        assert resp.status == 429 and resp.headers["Retry-After"] == "30"
        assert (await resp.json())["code"] == "AGENT.BUSY"
        records = list((tmp_path / "state" / "zstack" / "commands").glob("*.json"))
        assert len(records) == 2
    finally:
        gate.set()
        await client.close()


async def test_a_callback_goes_only_where_the_command_came_from(tmp_path: Path) -> None:
    client = await start_agent(tmp_path)
    try:
        target = qcow2(tmp_path / "rootA" / "t.qcow2")
        resp = await client.post(
            "/vm/blklivemigration",
            json=blk_body(VM_1, "/o.qcow2", target, api="a", name="n"),
            headers={"taskuuid": zs_uuid(), "callbackurl": "http://169.254.169.254/latest"},
        )
        assert resp.status == 400 and (await resp.json())["field"] == "callbackurl"
        assert not (tmp_path / "state" / "zstack" / "commands").exists()
    finally:
        await client.close()
