"""Delivery of final results to the management plane: the journal's outbox, retried with backoff.

The task manager writes an outbox row in the same transaction as a task's final state; this deliverer
POSTs each row to its ``callbackUrl`` (header ``taskuuid``) until a 2xx answer, waiting ``retry_initial_s``
doubled per failed attempt up to ``retry_max_s`` (with +-20 % jitter), and gives up after ``retry_for_s``
or ``retry_max_attempts`` (logged as an error; the task's result stays in the API). No redirect is followed
and at most ``MAX_ANSWER_BYTES`` of an answer is read (``agent.report.destinations``). Rows survive
restarts: a new deliverer picks up whatever is due. It runs in its own background task, so a dead or slow
management server never touches a migration.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import aiohttp

from agent.config import ReportConfig
from agent.report.destinations import MAX_ANSWER_BYTES
from agent.tasks.journal import Journal, OutboxEntry

log = logging.getLogger(__name__)

#: Rows handled per round; each one is bounded by the report timeout, and they go out concurrently.
BATCH = 16
#: The longest the loop sleeps without looking at the outbox again (a clock jump cannot strand a row).
MAX_IDLE_S = 60.0


def backoff_delay(policy: ReportConfig, attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``attempts`` failed attempts (>= 1): exponential, capped, jittered."""
    base = min(policy.retry_max_s, policy.retry_initial_s * (2.0 ** max(0, attempts - 1)))
    return float(base * (0.8 + 0.4 * rand()))


class OutboxDeliverer:
    """Owns the delivery loop; ``start()``, ``wake()`` when a row was added, ``stop()`` on the way out."""

    def __init__(
        self,
        journal: Journal,
        session: aiohttp.ClientSession,
        policy: ReportConfig,
        *,
        on_failure: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._journal = journal
        self._session = session
        self._policy = policy
        self._on_failure = on_failure
        self._clock = clock
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="outbox-deliverer")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._loop_task is None:
            return
        self._loop_task.cancel()
        try:
            await self._loop_task
        except asyncio.CancelledError:
            if (current := asyncio.current_task()) is not None and current.cancelling():
                raise
        self._loop_task = None

    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                due = await self._journal.due_outbox(self._clock(), BATCH)
                if due:
                    await asyncio.gather(*(self._deliver(entry) for entry in due))
                    continue
                next_at = await self._journal.next_outbox_at()
                idle = MAX_IDLE_S if next_at is None else min(MAX_IDLE_S, max(0.0, next_at - self._clock()))
                try:
                    async with asyncio.timeout(idle):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the outbox delivery loop failed; final reports wait for the next start")
            raise

    async def _deliver(self, entry: OutboxEntry) -> None:
        error = await self._post(entry)
        now = self._clock()
        if error is None:
            await self._journal.outbox_delivered(entry.id, now)
            log.info(
                "task=%s: final report delivered to %s (attempt %d)",
                entry.task_uuid,
                entry.url,
                entry.attempts + 1,
            )
            return
        self._on_failure()
        attempts = entry.attempts + 1
        if now - entry.created_at >= self._policy.retry_for_s or attempts >= self._policy.retry_max_attempts:
            await self._journal.outbox_given_up(entry.id, now, error)
            log.error(
                "task=%s: giving up on the final report to %s after %d attempts: %s",
                entry.task_uuid,
                entry.url,
                attempts,
                error,
            )
            return
        delay = backoff_delay(self._policy, attempts)
        await self._journal.outbox_failed(entry.id, attempts, now + delay, error)
        log.warning(
            "task=%s: final report to %s failed (attempt %d: %s); retry in %.1f s",
            entry.task_uuid,
            entry.url,
            attempts,
            error,
            delay,
        )

    async def _post(self, entry: OutboxEntry) -> str | None:
        """POST one row; None when delivered, else what went wrong."""
        headers = {"taskuuid": entry.task_uuid, "Content-Type": "application/json"}
        try:
            async with (
                asyncio.timeout(self._policy.timeout_s),
                self._session.post(
                    entry.url, data=entry.body, headers=headers, allow_redirects=False
                ) as response,
            ):
                await response.content.read(MAX_ANSWER_BYTES)
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {self._policy.timeout_s:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as err:
            return f"{type(err).__name__}: {err}"
