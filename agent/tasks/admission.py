"""Admission: at most ``limit`` tasks run at once on this host; the others wait in one queue (issue 24).

The queue is ordered by rank: a task resumed after a restart that had already started its work comes first
(libvirt may be moving it right now), then the higher ``priority``, then the earlier request (first come,
first served within a priority), then the order of arrival in this agent. A slot that frees goes to the
head of the queue; a waiter that is cancelled leaves it (and hands a slot it was just given to the next).
The queue itself is not stored: its order is derived from what the journal keeps (state, priority, creation
time), so it is the same after a restart.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Rank:
    """Where a task stands in the queue: smaller first."""

    resumed: int  # 0: resumed after a restart with its work under way; 1: not started yet
    priority: int  # the request's priority, negated (higher priority first)
    created_at: float
    arrival: int  # ties: the order in which this agent saw them


@dataclass(eq=False)
class _Waiter:
    rank: Rank
    task_uuid: str
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    """Slots for running tasks and the queue before them; ``on_change`` is called (synchronously) whenever the
    queue's order or content changed, so that the waiting tasks' positions can be shown."""

    def __init__(self, limit: int, *, on_change: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.running = 0
        self._waiting: list[_Waiter] = []
        self._arrivals = itertools.count()
        self._on_change = on_change

    def rank(self, *, priority: int, created_at: float, resumed: bool = False) -> Rank:
        return Rank(0 if resumed else 1, -priority, created_at, next(self._arrivals))

    def set_limit(self, limit: int) -> None:
        """A new number of slots: a raised limit admits the head of the queue at once; a lowered one lets
        the running tasks finish and admits no one until fewer run."""
        self.limit = limit
        self._grant()
        self._on_change()

    def must_wait(self) -> bool:
        """Whether a task asking now would have to queue."""
        return self.running >= self.limit or bool(self._waiting)

    async def enter(self, task_uuid: str, rank: Rank) -> None:
        """Take a slot, waiting in the queue for it when every slot is taken or others wait already."""
        if not self.must_wait():
            self.running += 1
            return
        waiter = _Waiter(rank, task_uuid)
        bisect.insort(self._waiting, waiter, key=lambda w: w.rank)
        self._on_change()
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                self._on_change()
            elif waiter.granted.done() and not waiter.granted.cancelled():
                self.leave()  # given a slot in the same moment: hand it on
            raise

    def leave(self) -> None:
        """Give a slot back; the head of the queue takes it."""
        self.running -= 1
        self._grant()

    def _grant(self) -> None:
        changed = False
        while self.running < self.limit and self._waiting:
            waiter = self._waiting.pop(0)
            self.running += 1
            waiter.granted.set_result(None)
            changed = True
        if changed:
            self._on_change()

    def position(self, task_uuid: str) -> int | None:
        """1 for the head of the queue; None when the task does not wait."""
        return next((i for i, w in enumerate(self._waiting, 1) if w.task_uuid == task_uuid), None)

    def waiting(self) -> list[str]:
        """The waiting tasks' uuids, head first."""
        return [w.task_uuid for w in self._waiting]
