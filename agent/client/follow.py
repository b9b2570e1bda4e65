"""Follow a task to its end: snapshots from the event stream, with polling whenever the stream fails.

The stream gives prompt updates; polling is the fallback that always works (an agent without the events
endpoint, a proxy that buffers, a stream that goes quiet). A short outage of the agent (a restart: migrations
survive it) is waited out for ``unreachable_for`` seconds before giving up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any, cast

from .errors import ApiError, BadResponse, ClientError
from .http import AgentClient
from .models import Progress, TaskView, is_final
from .sse import ServerEvent

log = logging.getLogger(__name__)


def apply_event(task: TaskView, event: ServerEvent) -> TaskView:
    """The task as it is after ``event``: a full or partial snapshot, or a bare progress object."""
    try:
        data: Any = event.json()
    except ValueError:
        return task
    if not isinstance(data, dict):
        return task
    if isinstance(data.get("task"), dict):
        data = data["task"]  # an envelope {"task": {...}}
    if "state" in data or "taskUuid" in data or "progress" in data:
        return cast(TaskView, {**task, **data})
    if event.event == "progress" or "percent" in data or "bytesDone" in data:
        progress = cast(Progress, {**task.get("progress", {}), **data})
        return {**task, "progress": progress}
    return task


async def follow_task(
    client: AgentClient,
    task_uuid: str,
    *,
    poll_interval: float = 1.0,
    idle_timeout: float = 45.0,
    unreachable_for: float = 30.0,
    use_events: bool = True,
) -> AsyncGenerator[TaskView, None]:
    """Yield the task's snapshots, the first at once and the last a full ``GET`` of the final task.

    ``idle_timeout``: a stream silent that long (not even the agent's 15 s keep-alive) is dropped for a poll
    and a new stream.

    Raises ClientError when the task is unknown or the agent stays unreachable for ``unreachable_for``.
    """
    task = await _get(client, task_uuid, poll_interval, unreachable_for)
    yield task
    streaming = use_events
    while not is_final(task):
        streamed = False
        if streaming:
            try:
                async with contextlib.aclosing(_stream(client, task_uuid, task, idle_timeout)) as snapshots:
                    async for snapshot in snapshots:
                        streamed, task = True, snapshot
                        yield task
            except (ApiError, BadResponse) as err:
                log.info("task %s: event stream refused (%s); polling instead", task_uuid, err)
                streaming = False
            except ClientError as err:
                log.info("task %s: event stream lost (%s); polling", task_uuid, err)
        if not streamed:
            # Nothing came (polling, or a stream that ended at once): pace the next request.
            await asyncio.sleep(poll_interval)
        latest = await _get(client, task_uuid, poll_interval, unreachable_for)
        if latest != task:
            task = latest
            yield task


async def _stream(
    client: AgentClient, task_uuid: str, task: TaskView, idle_timeout: float
) -> AsyncGenerator[TaskView, None]:
    """Snapshots from the event stream until it ends or the task does; a silent connection raises."""
    async with contextlib.aclosing(client.events(task_uuid, read_timeout=idle_timeout)) as events:
        async for event in events:
            updated = apply_event(task, event)
            if updated != task:
                task = updated
                yield task
            if is_final(task):
                return


async def _get(client: AgentClient, task_uuid: str, poll_interval: float, unreachable_for: float) -> TaskView:
    """``GET`` the task, retrying transient failures for at most ``unreachable_for`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + unreachable_for
    while True:
        try:
            return await client.task(task_uuid)
        except ClientError as err:
            if not err.transient or loop.time() >= deadline:
                raise
            log.info("task %s: agent not answering (%s); retrying", task_uuid, err)
        await asyncio.sleep(poll_interval)
