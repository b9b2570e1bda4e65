"""Progress reports to the management plane: ``POST progressUrl`` at most once per interval per task.

Coalesced, latest wins: ``push()`` only replaces the task's pending payload (a callable building the body at
send time) and wakes its sender; nothing is ever queued. Each task has one small sender task while it has
something to say; a slow or dead server delays only that sender (bounded by the report timeout), never the
migration, which calls ``push()`` synchronously. Failures are counted and logged at debug level: progress is
best effort, the final result goes through the outbox (``agent.report.outbox``). A report carries the header
``taskuuid`` unless ``push()`` names its own headers (the ZStack dialect sends ``commandpath`` instead).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.report.destinations import MAX_ANSWER_BYTES

log = logging.getLogger(__name__)

Payload = Callable[[], dict[str, Any]]


@dataclass
class _Pending:
    url: str
    payload: Payload
    final: bool
    headers: Mapping[str, str] | None = None


class ProgressReporter:
    """Owns one sender task per reporting task; ``close()`` cancels and awaits them."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        interval_s: float,
        timeout_s: float,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self._session = session
        self._interval = interval_s
        self._timeout = timeout_s
        self._on_failure = on_failure
        self._pending: dict[str, _Pending] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def push(
        self,
        task_uuid: str,
        url: str,
        payload: Payload,
        *,
        final: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Make ``payload`` the next report of ``task_uuid`` (replacing any unsent one); ``final`` ends it.

        ``headers`` replace the default ``taskuuid`` header (Content-Type is always JSON)."""
        if self._closed:
            return
        self._pending[task_uuid] = _Pending(url, payload, final, headers)
        wakeup = self._wakeups.get(task_uuid)
        if wakeup is None:
            wakeup = self._wakeups[task_uuid] = asyncio.Event()
            sender = asyncio.create_task(self._send_loop(task_uuid, wakeup), name=f"progress-{task_uuid}")
            self._senders[task_uuid] = sender
            sender.add_done_callback(lambda done: self._sender_done(task_uuid, done))
        wakeup.set()

    @property
    def active_senders(self) -> int:
        return len(self._senders)

    async def close(self) -> None:
        self._closed = True
        senders = list(self._senders.values())
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)

    def _sender_done(self, task_uuid: str, sender: asyncio.Task[None]) -> None:
        if self._senders.get(task_uuid) is sender:
            del self._senders[task_uuid]
            del self._wakeups[task_uuid]
            if not sender.cancelled() and sender.exception() is not None:
                log.error("task=%s: progress sender failed: %s", task_uuid, sender.exception())
            pending = self._pending.get(task_uuid)
            if pending is not None and not self._closed:
                # Pushed after the final report was taken: start over so it is not lost.
                del self._pending[task_uuid]
                self.push(
                    task_uuid, pending.url, pending.payload, final=pending.final, headers=pending.headers
                )

    async def _send_loop(self, task_uuid: str, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await wakeup.wait()
            wakeup.clear()
            pending = self._pending.pop(task_uuid, None)
            if pending is None:
                continue
            started = loop.time()
            await self._post(task_uuid, pending)
            if pending.final:
                return
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))

    async def _post(self, task_uuid: str, pending: _Pending) -> None:
        started = time.monotonic()
        try:
            body = json.dumps(pending.payload())
            async with (
                asyncio.timeout(self._timeout),
                self._session.post(
                    pending.url,
                    data=body,
                    headers={
                        **(pending.headers if pending.headers is not None else {"taskuuid": task_uuid}),
                        "Content-Type": "application/json",
                    },
                    allow_redirects=False,
                ) as response,
            ):
                await response.content.read(MAX_ANSWER_BYTES)
                if 200 <= response.status < 300:
                    return
                problem = f"HTTP {response.status}"
        except TimeoutError:
            problem = f"no answer within {self._timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError, TypeError) as err:
            problem = f"{type(err).__name__}: {err}"
        self._on_failure()
        log.debug(
            "task=%s: progress report to %s failed after %.1f s: %s",
            task_uuid,
            pending.url,
            time.monotonic() - started,
            problem,
        )
