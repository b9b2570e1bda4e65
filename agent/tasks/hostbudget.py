"""The host-wide budget (issue 24): the tasks that move a VM to another host share one outgoing bandwidth.

Config ``limits.host_bandwidth`` (MiB/s, 0: none) sets it at start; ``PATCH /v1/host/budget`` changes it
while the agent runs (until the next start). Each running cross-host task gets a share (``shares.split``:
a floor for every task, the rest by priority, never above the task's own bandwidth), re-split whenever a
task starts, is retuned or ends. A task's share is
applied through its ``LiveLimits`` (``retune(host_share=...)``: every disk mirror, the migration stream,
the controller) while its streams run, and read by its engine when they start (``ctx.host_share``).
Shares that shrink are applied before shares that grow, so the link is not oversubscribed in between.

The shares add up to less than the budget, by what the link carries beyond QEMU's own limits (measured in
the lab, tests/lab/test_host_budget.py, QEMU 7.2 over TLS): a disk mirror sends up to a whole buffer
(``MIRROR_BUFFER``) at once and then sleeps it off, so a 5 s window can hold up to one buffer more than its
share from every running mirror (seen: 16 MiB steps of the counters, windows up to 1.15 x the budget when
the shares added up to all of it); and the wire carries TCP and TLS framing on top of the bytes QEMU
counts (``WIRE_OVERHEAD``).

A same-host move does not cross the migration link and is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError
from agent.tasks.shares import Claim, split
from agent.tasks.task import Task
from agent.units import MiB

log = logging.getLogger(__name__)

#: QEMU 7.2's mirror buffer: what one job can put on the wire at once (seen as 16 MiB steps of the counters).
MIRROR_BUFFER = 16 * MiB
#: The window the budget is held over.
WINDOW_S = 5.0
#: Bytes on the wire per byte QEMU counts (TCP/IP and TLS framing).
WIRE_OVERHEAD = 1.04


def planned(budget: int, mirrors: int = 1) -> int:
    """What the shares add up to under ``budget`` with ``mirrors`` disk mirrors running: the wire's framing
    and one buffer per mirror and window set aside, but never less than half of it."""
    return max(budget // 2, int(budget / WIRE_OVERHEAD - mirrors * MIRROR_BUFFER / WINDOW_S))


class HostBudget:
    """The outgoing budget (bytes/s; None: none) and the running cross-host tasks it is shared among.
    ``close()`` cancels and awaits the re-split in flight."""

    def __init__(self, outgoing: int | None, *, crosses_link: Callable[[Task], bool]) -> None:
        self.outgoing = outgoing or None
        self._crosses_link = crosses_link
        self._tasks: dict[str, Task] = {}
        self.shares: dict[str, int] = {}
        self._dirty = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    # -- what changes the split ------------------------------------------------------------------------

    def join(self, task: Task) -> None:
        """A task was admitted: it gets its share before its engine starts."""
        if self._crosses_link(task):
            self._tasks[task.uuid] = task
            self._resplit()

    def leave(self, task: Task) -> None:
        if self._tasks.pop(task.uuid, None) is not None:
            task.host_share = None
            self._resplit()

    def task_changed(self, task: Task) -> None:
        """A task's own cap changed (a retune): re-split when it is one of ours."""
        if task.uuid in self._tasks:
            self._resplit()

    def set_outgoing(self, budget: int | None) -> None:
        self.outgoing = budget or None
        log.info("host budget: outgoing %s", "none" if self.outgoing is None else f"{self.outgoing} B/s")
        self._resplit()

    # -- the split and its application -------------------------------------------------------------------

    def _resplit(self) -> None:
        if self.outgoing is None:
            self.shares = {}
        else:
            total = planned(self.outgoing, self.mirrors())
            self.shares = split(total, [_claim(t) for t in self._tasks.values()])
        for uuid, task in self._tasks.items():
            task.host_share = self.shares.get(uuid)
        self._dirty.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._apply_loop(), name="host-budget")

    def mirrors(self) -> int:
        """Disk mirrors of the running tasks (one for a task whose streams have not been read yet)."""
        return sum(
            max(1, len(t.live_limits.effective.disks) if t.live_limits is not None else 1)
            for t in self._tasks.values()
        )

    async def _apply_loop(self) -> None:
        """Applies the latest split to the running streams until nothing changed meanwhile."""
        try:
            while self._dirty.is_set():
                self._dirty.clear()
                await self._apply()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("host budget: applying the shares failed")
            raise

    async def _apply(self) -> None:
        moves: list[tuple[bool, Task, int | None]] = []
        for task in list(self._tasks.values()):
            limits = task.live_limits
            if limits is None or limits.host_share == task.host_share:
                continue
            share = task.host_share
            grows = share is None or (limits.budget is not None and share >= limits.budget)
            moves.append((grows, task, share))
        for _, task, share in sorted(moves, key=lambda m: m[0]):  # shrinking ones first
            limits = task.live_limits
            if limits is None:
                continue
            try:
                await limits.retune(host_share=share)
            except AgentError as err:  # logged with the knob by the limits; the next split tries again
                log.warning(
                    "task=%s vm=%s: host share %s not applied: %s",
                    task.uuid,
                    task.vm_uuid,
                    share,
                    err.description,
                )

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker  # a failure was logged by the loop itself

    def view(self) -> dict[str, Any]:
        return {
            "outgoing": {
                "bandwidth": None if self.outgoing is None else self.outgoing // MiB,
                "bytesPerSecond": self.outgoing,
                "plannedBytesPerSecond": None
                if self.outgoing is None
                else planned(self.outgoing, self.mirrors()),
                "shares": [
                    {
                        "taskUuid": uuid,
                        "vmUuid": task.vm_uuid,
                        "priority": task.request.priority,
                        "state": task.state.value,
                        "bytesPerSecond": self.shares.get(uuid),
                    }
                    for uuid, task in self._tasks.items()
                ],
            }
        }


def _claim(task: Task) -> Claim:
    cap = task.tuning.bandwidth_mib
    return Claim(
        task.uuid,
        weight=task.request.priority,
        bound=cap * MiB if cap else None,
    )
