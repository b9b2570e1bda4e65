"""The guests' disk writes on this host, sampled before anyone asks (issue 24).

A capped move needs each disk's write rate before its copy starts (a hot disk is mirrored in write-blocking
mode from the start; across hosts that mode cannot change once the migration runs). Measuring it then cost
every capped move a pause before its first byte. Instead one loop reads every running VM's write counters
with one libvirt call (``VirtHost.all_block_writes``) every ``EVERY_S`` and keeps the last ``KEEP_S`` of them:
a task reads the rate over the seconds before its request.

A counter that went down (the VM was restarted) starts its VM's history over; a VM that is not running is
forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.errors import VirtError
from agent.virt.host import VirtHost

log = logging.getLogger(__name__)

#: One sample of every running VM's counters this often (one libvirt call for all of them).
EVERY_S = 1.0
#: Samples are kept this long.
KEEP_S = 5.0


@dataclass(frozen=True)
class WriteSample:
    """A VM's bytes written to each disk since it started (``wr_bytes``), at ``at`` (monotonic seconds)."""

    at: float
    written: Mapping[str, int]


class WriteHistory:
    """Every running VM's recent write counters; ``start()`` begins the sampling loop, ``stop()`` cancels
    and awaits it."""

    def __init__(
        self,
        host: VirtHost,
        *,
        every_s: float = EVERY_S,
        keep_s: float = KEEP_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self.every_s = every_s
        self.keep_s = keep_s
        self._clock = clock
        self._samples: dict[str, deque[WriteSample]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="write-history")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        unreachable = False
        try:
            while True:
                try:
                    await self.sample()
                    unreachable = False
                except VirtError as err:  # libvirtd restarting: nothing to read; the next round tries again
                    if not unreachable:
                        log.warning("guest write counters not sampled: %s", err.description)
                    unreachable = True
                await asyncio.sleep(self.every_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the guest write counters' sampling loop failed")
            raise

    async def sample(self) -> None:
        """Read every running VM's counters now."""
        counters = await self._host.all_block_writes()
        self.add(self._clock(), counters)

    def add(self, now: float, counters: Mapping[str, Mapping[str, int]]) -> None:
        """Keep one reading of every running VM (``counters``: vm uuid -> disk -> bytes written)."""
        for vm_uuid in set(self._samples) - set(counters):
            del self._samples[vm_uuid]
        for vm_uuid, written in counters.items():
            kept = self._samples.setdefault(vm_uuid, deque())
            if kept and any(written.get(d, n) < n for d, n in kept[-1].written.items()):
                kept.clear()  # a counter went down: the VM started again
            kept.append(WriteSample(now, dict(written)))
            while kept and kept[0].at < now - self.keep_s:
                kept.popleft()

    def samples(self, vm_uuid: str, disks: Sequence[str]) -> list[WriteSample]:
        """This VM's kept samples that cover every one of ``disks``, oldest first."""
        return [s for s in self._samples.get(vm_uuid, ()) if all(d in s.written for d in disks)]
