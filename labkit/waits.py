"""Waiting in an async test or benchmark for something the lab shows (a block job, a callback, a log line):
the check runs in a thread, so a blocking one (virsh, a file) never stalls the caller's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(check: Callable[[], bool], what: str, *, within: float = 60, every: float = 0.1) -> None:
    """Until ``check()`` holds; ``TimeoutError`` naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(every)
