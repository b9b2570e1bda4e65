"""A stand-in for the management plane: an aiohttp server on the lab bridge that records what the agents
POST to it (final callbacks, progress reports, ZStack commands). For the lab tests and the benchmark (it
needs the agent's virtualenv); the lab's own commands never import it.

It runs in a thread of its own with its own event loop, so that a caller blocked in a lab command (guest
verify, ``scripts/lab``) never keeps an agent's callback waiting, and the arrival time of each call is when
it came, not when the caller looked.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from .layout import BRIDGE_ADDRESS
from .waits import wait_until


@dataclass(frozen=True)
class Call:
    """One POST the server received: path, headers, JSON body, and when it arrived (monotonic)."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float


class ManagementPlane:
    """Records every POST to ``paths`` and answers 200. ``start()``/``stop()``, or use it as a context."""

    def __init__(
        self, paths: Sequence[str], *, address: str = BRIDGE_ADDRESS, name: str = "mgmt-plane"
    ) -> None:
        self.address = address
        self.port = 0
        self._paths = tuple(paths)
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application()
        for path in self._paths:
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.address, 0).start()
        self.port = self._runner.addresses[0][1]

    async def _handle(self, request: web.Request) -> web.Response:
        at = time.monotonic()
        call = Call(request.path, dict(request.headers), json.loads(await request.read()), at)
        with self._lock:
            self._calls.append(call)
        return web.Response(status=200)

    def url(self, path: str) -> str:
        return f"http://{self.address}:{self.port}{path}"

    def calls(self, path: str, task_uuid: str | None = None) -> list[Call]:
        """The calls to ``path`` so far, in arrival order; with ``task_uuid``, those with that header."""
        with self._lock:
            return [
                c
                for c in self._calls
                if c.path == path and (task_uuid is None or c.headers.get("taskuuid") == task_uuid)
            ]


class CallbackRecorder(ManagementPlane):
    """The final results the agents POST to ``callbackUrl`` (``url()``), by the ``taskuuid`` header."""

    PATH = "/callback"

    def __init__(self, *, address: str = BRIDGE_ADDRESS) -> None:
        super().__init__([self.PATH], address=address, name="callback-recorder")

    def url(self, path: str = PATH) -> str:
        return super().url(path)

    def _final(self, task_uuid: str) -> list[Call]:
        return self.calls(self.PATH, task_uuid)

    async def final(self, task_uuid: str, within: float) -> dict[str, Any]:
        """The final result posted for the task (the first; a redelivery after a restart must be equal)."""
        await wait_until(lambda: bool(self._final(task_uuid)), f"a callback for {task_uuid}", within=within)
        bodies = [c.body for c in self._final(task_uuid)]
        assert all(b == bodies[0] for b in bodies), f"callbacks disagree: {bodies}"
        return dict(bodies[0])

    async def arrival(self, task_uuid: str, within: float) -> float | None:
        """When the task's final result first arrived (monotonic), or None if it did not within ``within``."""
        try:
            await wait_until(lambda: bool(self._final(task_uuid)), "a callback", within=within)
        except TimeoutError:
            return None
        return self._final(task_uuid)[0].at
