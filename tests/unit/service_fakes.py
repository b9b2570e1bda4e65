"""Fakes and helpers for the service tests: a config on tmp_path, a scripted engine, a VM inventory and a
real loopback receiver for the management plane's callbacks and progress reports.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from agent.config import AgentConfig, parse_config
from agent.errors import AgentError, NotFound, VirtError
from agent.migration.engine import Engine, TaskContext
from agent.migration.limits import Effective, LiveLimits, Targets
from agent.migration.peer.wire import IncomingDisk, IncomingSpec
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState

TOKEN = "s3cret-token-for-tests"
HOST_UUID = "6f1b7c1e-6a52-4e8e-9a8e-3c0d2b1f0a11"
STORAGE_A = "0b0f1c3a-1111-4a4a-8b8b-000000000001"
STORAGE_B = "0b0f1c3a-2222-4a4a-8b8b-000000000002"
VM_1 = "11111111-2222-4333-8444-555555555501"
VM_2 = "11111111-2222-4333-8444-555555555502"
VM_3 = "11111111-2222-4333-8444-555555555503"
VM_4 = "11111111-2222-4333-8444-555555555504"
VM_5 = "11111111-2222-4333-8444-555555555505"
UNKNOWN_VM = "11111111-2222-4333-8444-5555555555ff"


def make_config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    for name in ("rootA", "rootB"):
        (tmp_path / name).mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "listen_address": "127.0.0.1",
        "token_file": str(token_file),
        "host_uuid": HOST_UUID,
        "state_dir": str(tmp_path / "state"),
        "shutdown_grace_s": 2.0,
        "storage": [
            {"uuid": STORAGE_A, "path": str(tmp_path / "rootA")},
            {"uuid": STORAGE_B, "path": str(tmp_path / "rootB")},
        ],
        "report": {"progress_interval_s": 0.2, "retry_initial_s": 0.05, "retry_max_s": 0.2, "timeout_s": 2.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


def body(**overrides: Any) -> dict[str, Any]:
    """A valid same-host migration body to STORAGE_A."""
    data: dict[str, Any] = {
        "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_A, "withDataVolumes": True},
        "migrateVm": {"downTime": 300, "bandwidth": 100},
        "systemTags": [],
        "userTags": [],
    }
    data.update(overrides)
    return data


Client = TestClient[web.Request, web.Application]

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Script:
    """What the fake engine does; tests hold it to gate, fail or inspect runs."""

    steps: int = 3
    step_s: float = 0.01
    item_bytes: int = 1000
    gate: asyncio.Event | None = None  # when set: the engine waits for it while COPYING
    fail: AgentError | None = None
    crash: Exception | None = None
    factory_error: Exception | None = None
    wait_tuning: bool = False
    streams: Any = None  # a ``limits.Streams``: the engine attaches its ``LiveLimits`` while COPYING
    switch_gate: asyncio.Event | None = None  # when set: the engine waits for it while SWITCHING
    verify_gate: asyncio.Event | None = None  # when set: the engine waits for it while VERIFYING
    resume_at_switch: bool = False  # a resumed run walks SWITCHING -> VERIFYING again (as a commit does)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: list[bool] = field(default_factory=list)  # ctx.detaching at each CancelledError
    tuned: list[tuple[int | None, int]] = field(default_factory=list)
    bandwidth_seen: list[int | None] = field(default_factory=list)  # ctx.bandwidth at each start (bytes/s)
    calls: list[tuple[str, bool]] = field(default_factory=list)  # (vm_uuid, resume)
    resume_data_seen: list[Any] = field(default_factory=list)


MiB = 1024 * 1024


class FakeStreams:
    """Knobs in memory: ``qemu`` is what QEMU holds; ``fail`` knobs raise that many times."""

    def __init__(self) -> None:
        self.qemu = Effective(disks={"vda": MiB, "vdb": MiB}, has_stream=True, stream=2 * MiB, downtime_ms=50)
        self.calls: list[tuple[str, int | None]] = []
        self.fail: dict[str, int] = {}
        self.asked: list[tuple[int | None, int]] = []
        self.gate: asyncio.Event | None = None

    def targets(self, budget: int | None, downtime_ms: int) -> Targets:
        self.asked.append((budget, downtime_ms))
        disk = 0 if budget is None else budget // 2
        return Targets(disks={"vda": disk, "vdb": disk}, stream=budget, downtime_ms=downtime_ms)

    async def _call(self, knob: str, value: int | None) -> None:
        self.calls.append((knob, value))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail.get(knob, 0) > 0:
            self.fail[knob] -= 1
            raise VirtError(f"libvirt: cannot set {knob}")

    async def set_disk_speed(self, target: str, bytes_per_s: int) -> None:
        await self._call(target, bytes_per_s)
        self.qemu = self.qemu.merged(Effective(disks={target: bytes_per_s}))

    async def set_stream_speed(self, bytes_per_s: int | None) -> None:
        await self._call("stream", bytes_per_s)
        self.qemu = self.qemu.merged(Effective(has_stream=True, stream=bytes_per_s))

    async def set_downtime(self, ms: int) -> None:
        await self._call("downtime", ms)
        self.qemu = self.qemu.merged(Effective(downtime_ms=ms))

    async def read(self) -> Effective:
        return self.qemu


class FakeEngine:
    """Walks PREPARING -> COPYING (progress on two items) -> SWITCHING -> VERIFYING like a real engine."""

    name = "fake"

    def __init__(self, script: Script) -> None:
        self.script = script

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]:
        script = self.script
        script.started.set()
        script.resume_data_seen.append(ctx.resume_data)
        script.bandwidth_seen.append(ctx.bandwidth)
        try:
            if ctx.resume_data is None:
                await ctx.enter(TaskState.PREPARING)
                await ctx.checkpoint({"step": "prepared"})
                await ctx.enter(TaskState.COPYING, "copying disks")
            elif script.resume_at_switch:
                await ctx.enter(TaskState.SWITCHING)
                await ctx.enter(TaskState.VERIFYING)
                return [{"uuid": "vol-root", "installPath": "/new/root.qcow2", "format": "qcow2", "size": 1}]
            if script.streams is not None:
                ctx.attach_limits(LiveLimits(ctx, script.streams))
            total = script.item_bytes
            for step in range(1, script.steps + 1):
                ctx.progress("vol-root", total * step // script.steps, total)
                ctx.progress("vol-data", total * step // script.steps, total)
                await asyncio.sleep(script.step_s)
                if script.gate is not None:
                    await script.gate.wait()
            if script.wait_tuning:
                await ctx.tuning_changed()
                script.tuned.append((ctx.bandwidth, ctx.downtime_ms))
            if script.crash is not None:
                raise script.crash
            if script.fail is not None:
                raise script.fail
            ctx.progress("memory", 500, 500)
            ctx.attach_limits(None)
            await ctx.enter(TaskState.SWITCHING)
            if script.switch_gate is not None:
                await script.switch_gate.wait()
            ctx.note("downtimeMs", 42)
            await ctx.enter(TaskState.VERIFYING)
            if script.verify_gate is not None:
                await script.verify_gate.wait()
        except asyncio.CancelledError:
            script.cancelled.append(bool(getattr(ctx, "detaching", False)))
            raise
        return [{"uuid": "vol-root", "installPath": "/new/root.qcow2", "format": "qcow2", "size": total}]


class FakeFactory:
    """The ``EngineFactory`` of the tests: records calls, hands out ``FakeEngine``s with one script."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.engine: type[FakeEngine] = FakeEngine

    def __call__(self, request: MigrationRequest, vm_uuid: str, resume: bool) -> Engine:
        self.script.calls.append((vm_uuid, resume))
        if self.script.factory_error is not None:
            raise self.script.factory_error
        return self.engine(self.script)


class FakeInventory:
    """``VmInventory`` with a fixed set of VMs; ``broken`` makes every call raise a bug-like error."""

    def __init__(self, *vm_uuids: str, broken: bool = False) -> None:
        self.vms = {uuid: {"uuid": uuid, "name": f"vm-{uuid[-2:]}", "state": "running"} for uuid in vm_uuids}
        self.broken = broken

    async def list_vms(self) -> list[dict[str, Any]]:
        if self.broken:
            raise RuntimeError("inventory exploded")
        return list(self.vms.values())

    async def describe_vm(self, vm_uuid: str) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("inventory exploded")
        if vm_uuid not in self.vms:
            raise NotFound(f"no VM {vm_uuid}", field="vmUuid")
        return {**self.vms[vm_uuid], "disks": [{"target": "vda", "chain": [{"path": "/a.qcow2"}]}]}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    at: float


class Receiver:
    """The management plane: records POSTs to /callback and /progress; ``status`` and ``delay`` steer it."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status = 200
        self.delay = 0.0
        self.changed = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/callback", self._handle)
        self.app.router.add_post("/progress", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        payload = json.loads(await request.read())
        if self.delay:
            await asyncio.sleep(self.delay)
        self.received.append(Received(request.path, dict(request.headers), payload, loop.time()))
        self.changed.set()
        return web.json_response({"ok": self.status < 300}, status=self.status)

    def of(self, path: str, status_ok_only: bool = False) -> list[Received]:
        return [r for r in self.received if r.path == path]


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], within: float = 5.0, every: float = 0.02
) -> None:
    """Poll ``check`` until it is true; fail the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await asyncio.sleep(every)


def one_disk_spec(migration_id: str, vm_uuid: str, **disk: Any) -> IncomingSpec:
    """An incoming migration's spec with one flat 1 MiB qcow2 disk, vda (``disk`` overrides its fields)."""
    fields: dict[str, Any] = {
        "target": "vda",
        "volumeUuid": "v1",
        "top": "top.qcow2",
        "format": "qcow2",
        "virtualSize": 1 << 20,
        "estimatedBytes": 0,
        "flatten": False,
        **disk,
    }
    return IncomingSpec(
        migrationId=migration_id,
        vmUuid=vm_uuid,
        dstPrimaryStorageUuid="b" * 32,
        disks=[IncomingDisk(**fields)],
    )
