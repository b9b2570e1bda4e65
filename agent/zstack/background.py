"""The adapter's background work (intakes, answers, delayed replies): owned, logged when it fails, and
cancelled and awaited at ``stop()``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundWork:
    """Tasks started by name; after ``stop()`` nothing new starts."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped = False

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self.stopped:
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def stop(self) -> None:
        self.stopped = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            log.error("%s failed: %s: %s", task.get_name(), type(err).__name__, err, exc_info=err)
