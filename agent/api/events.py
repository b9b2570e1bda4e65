"""``GET /v1/tasks/{taskUuid}/events``: server-sent events with the task's view after every change.

Each event carries the whole task view as JSON: ``event: state`` when the state changed since the previous
event, ``event: progress`` otherwise. The stream starts with the current view and ends after a view in a
final state. Changes are coalesced, never queued: at most one event per ``MIN_INTERVAL_S``, a slow reader
gets the latest view when it is ready again, and one that takes no data for ``WRITE_TIMEOUT_S`` is dropped.
A comment line every ``KEEPALIVE_S`` keeps proxies from closing an idle stream. The stream also ends when
the agent stops.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from agent.api.keys import MANAGER, SERVICE
from agent.api.validation import path_uuid
from agent.errors import NotFound

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
MIN_INTERVAL_S = 0.1
WRITE_TIMEOUT_S = 30.0


async def task_events(request: web.Request) -> web.StreamResponse:
    task_uuid = path_uuid(request, "taskUuid")
    task = await request.app[MANAGER].find(task_uuid)
    if task is None:
        raise NotFound(f"no task {task_uuid}", field="taskUuid")
    stopping = request.app[SERVICE].stopping
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    last_state: str | None = None
    try:
        while True:
            changed = task.change_waiter()  # taken before the view, so no change falls in between
            view = task.view()
            kind = "state" if view["state"] != last_state else "progress"
            last_state = view["state"]
            await _write(response, f"event: {kind}\ndata: {json.dumps(view, default=str)}\n\n")
            if task.state.final:
                break
            await asyncio.sleep(MIN_INTERVAL_S)  # coalesce bursts of progress into one event
            while not await _wait(changed, stopping):
                if stopping.is_set():
                    await response.write_eof()
                    return response
                await _write(response, ": keepalive\n\n")
    except (ConnectionResetError, TimeoutError) as err:
        log.info("task=%s vm=%s: event stream reader gone: %s", task.uuid, task.vm_uuid, type(err).__name__)
        return response
    await response.write_eof()
    return response


async def _write(response: web.StreamResponse, text: str) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await response.write(text.encode())


async def _wait(changed: asyncio.Event, stopping: asyncio.Event) -> bool:
    """True when the task changed; False on keepalive time or when the agent stops."""
    waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return changed.is_set()
