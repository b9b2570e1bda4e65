"""A stand-in for the agent's HTTP API, for the client's and the CLI's unit tests.

It speaks the wire format of DESIGN.md (bearer auth, ErrorCode bodies, task views, server-sent events) and
records every request; a migration plays a scripted list of task snapshots. ``ThreadedServer`` runs it on
loopback in its own thread, so the CLI's ``main()`` (which owns its event loop) can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

TOKEN = "s3cret-token"
VM_UUID = "8a5b7c6d-1e2f-4a3b-9c8d-7e6f5a4b3c2d"
STORAGE_UUID = "0f1e2d3c-4b5a-4978-8a9b-c0d1e2f3a4b5"
NEW_PATH = "/var/lib/ksa/storage-b/vol-root.qcow2"
BASE_PATH = "/var/lib/ksa/storage-b/vol-root-base.qcow2"


def error_code(code: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "description": description, "details": None, "cause": None, **extra}


def snapshot(task_uuid: str, state: str, percent: float, done: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "taskUuid": task_uuid,
        "vmUuid": VM_UUID,
        "state": state,
        "phase": extra.pop("phase", state.lower()),
        "progress": {
            "percent": percent,
            "bytesDone": done,
            "bytesTotal": 4 * 1024**3,
            "bytesPerSecond": 100 * 1024**2,
            "etaSeconds": 12.0,
        },
        "downtimeMs": None,
        "error": None,
        "inventory": None,
        **extra,
    }


def success_script(task_uuid: str) -> list[dict[str, Any]]:
    # The agent's inventory (agent.migration.inventory): every file disk, its backing chain below the top.
    inventory = {
        "vmUuid": VM_UUID,
        "volumes": [
            {
                "uuid": "vol-root",
                "deviceName": "vda",
                "type": "Root",
                "moved": True,
                "installPath": NEW_PATH,
                "primaryStorageUuid": STORAGE_UUID,
                "format": "qcow2",
                "size": 4 * 1024**3,
                "actualSize": 1024**3,
                "backingChain": [
                    {"installPath": BASE_PATH, "format": "qcow2", "primaryStorageUuid": STORAGE_UUID}
                ],
            },
        ],
    }
    final = snapshot(task_uuid, "SUCCEEDED", 100.0, 4 * 1024**3, downtimeMs=23, inventory=inventory)
    return [
        snapshot(task_uuid, "PENDING", 0.0),
        snapshot(task_uuid, "COPYING", 25.0, 1024**3),
        snapshot(task_uuid, "COPYING", 60.0, 2 * 1024**3),
        snapshot(task_uuid, "SWITCHING", 99.0, 4 * 1024**3),
        final,
    ]


def failure_script(task_uuid: str, state: str = "FAILED") -> list[dict[str, Any]]:
    error = error_code(
        "AGENT.CONVERGENCE_FAILED",
        "memory did not converge within 300 ms downtime",
        details="dirty rate 900 MiB/s above bandwidth 100 MiB/s",
    )
    return [
        snapshot(task_uuid, "PENDING", 0.0),
        snapshot(task_uuid, "CONVERGING", 40.0, 1024**3),
        snapshot(task_uuid, state, 40.0, 1024**3, error=error if state == "FAILED" else None),
    ]


@dataclass
class ScriptedTask:
    """A task whose views come from a script; each GET moves one step on, the event stream plays the rest."""

    snapshots: list[dict[str, Any]]
    cursor: int = 0

    @property
    def current(self) -> dict[str, Any]:
        return copy.deepcopy(self.snapshots[self.cursor])

    def step(self) -> dict[str, Any]:
        view = self.current
        self.cursor = min(self.cursor + 1, len(self.snapshots) - 1)
        return view


@dataclass
class Recorded:
    method: str
    path: str
    raw_path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeAgent:
    """The fake's state; tests set the knobs, then read ``requests``."""

    script: str = "success"  # success | failed | cancelled
    tasks: dict[str, ScriptedTask] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    events_status: int | None = None  # answer the events endpoint with this error status instead
    events_idle: bool = False  # keep the event stream open without sending anything
    event_delay: float = 0.0
    fail_with: tuple[int, dict[str, Any]] | None = None  # every authenticated call answers this
    vms: list[dict[str, Any]] = field(default_factory=list)

    def add_task(self, task_uuid: str, snapshots: list[dict[str, Any]]) -> None:
        self.tasks[task_uuid] = ScriptedTask(snapshots)

    def calls(self, method: str, suffix: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    # -- the app ---------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record, self._auth])
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/v1/host", self._host)
        app.router.add_get("/v1/vms", self._list_vms)
        app.router.add_get("/v1/vms/{vm}", self._vm)
        app.router.add_post("/v1/vms/{vm}/storage-migrations", self._migrate)
        app.router.add_get("/v1/tasks", self._list_tasks)
        app.router.add_get("/v1/tasks/{task}", self._task)
        app.router.add_patch("/v1/tasks/{task}", self._patch)
        app.router.add_post("/v1/tasks/{task}/cancel", self._cancel)
        app.router.add_get("/v1/tasks/{task}/events", self._events)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        self.requests.append(
            Recorded(request.method, request.path, request.raw_path, dict(request.headers), body)
        )
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/v1/health":
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return web.json_response(
                    error_code("AGENT.UNAUTHORIZED", "missing or wrong token"), status=401
                )
            if self.fail_with is not None:
                status, body = self.fail_with
                return web.json_response(body, status=status)
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": "0.1.0"})

    async def _host(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "hostUuid": "5d2c1b0a-9f8e-4d7c-8b6a-5f4e3d2c1b0a",
                "hostname": "hostB",
                "version": "0.1.0",
                "cpu": {"count": 2, "percent": 3.5, "loadAverage": [0.5, 0.25, 0.0]},
                "memory": {"totalBytes": 8 * 1024**3, "availableBytes": 6 * 1024**3, "percent": 25.0},
                "storage": [
                    {
                        "uuid": STORAGE_UUID,
                        "path": "/var/lib/ksa/storage-b",
                        "freeBytes": 50 * 1024**3,
                        "totalBytes": 100 * 1024**3,
                    },
                    {
                        "uuid": VM_UUID,
                        "path": "/gone",
                        "freeBytes": None,
                        "totalBytes": None,
                        "error": "No such file",
                    },
                ],
                "tasks": {"COPYING": 1},
            }
        )

    async def _list_vms(self, request: web.Request) -> web.Response:
        return web.json_response({"vms": self.vms})

    async def _vm(self, request: web.Request) -> web.Response:
        for vm in self.vms:
            if vm["uuid"] == request.match_info["vm"]:
                return web.json_response(vm)
        return web.json_response(error_code("AGENT.NOT_FOUND", "no such VM"), status=404)

    async def _migrate(self, request: web.Request) -> web.Response:
        body = await request.json()
        task_uuid = body.get("taskUuid") or str(uuid.uuid4())
        if task_uuid not in self.tasks:
            if self.script == "success":
                self.add_task(task_uuid, success_script(task_uuid))
            else:
                self.add_task(task_uuid, failure_script(task_uuid, self.script.upper()))
        return web.json_response(self.tasks[task_uuid].current, status=202)

    async def _list_tasks(self, request: web.Request) -> web.Response:
        return web.json_response({"tasks": [task.current for task in self.tasks.values()]})

    def _scripted(self, request: web.Request) -> ScriptedTask:
        task = self.tasks.get(request.match_info["task"])
        if task is None:
            raise web.HTTPNotFound(
                text=json.dumps(error_code("AGENT.NOT_FOUND", "no such task")),
                content_type="application/json",
            )
        return task

    async def _task(self, request: web.Request) -> web.Response:
        return web.json_response(self._scripted(request).step())

    async def _patch(self, request: web.Request) -> web.Response:
        task = self._scripted(request)
        return web.json_response({**task.current, "tuning": await request.json()})

    async def _cancel(self, request: web.Request) -> web.Response:
        task = self._scripted(request)
        return web.json_response({**task.current, "state": "CANCELLING"})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        task = self._scripted(request)
        if self.events_status is not None:
            return web.json_response(
                error_code("AGENT.NOT_FOUND", "no events here"), status=self.events_status
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        if self.events_idle:
            await asyncio.sleep(3600)
        await response.write(b": keep-alive\n\n")
        while True:
            view = task.current
            data = json.dumps(view).encode()
            # Split the event across writes: the client must reassemble lines from arbitrary chunks.
            await response.write(b"event: task\ndata: " + data[:7])
            await response.write(data[7:] + b"\n\n")
            if task.cursor == len(task.snapshots) - 1:
                break
            task.cursor += 1
            if self.event_delay:
                await asyncio.sleep(self.event_delay)
        await response.write_eof()
        return response


@contextlib.contextmanager
def running(agent: FakeAgent) -> Iterator[str]:
    """The fake on loopback for the length of a ``with``; gives its base URL."""
    server = ThreadedServer(agent.app())
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


class ThreadedServer:
    """Runs an aiohttp app on 127.0.0.1 (a free port) in a thread with its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.url = ""

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._runner.setup(), self._loop).result(10)
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(site.start(), self._loop).result(10)
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        await self._runner.cleanup()
        # Handlers still streaming (an idle event stream) are cancelled here, not destroyed with the loop.
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
