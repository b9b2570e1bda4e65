"""The guest's write rate on each moving disk when a copy starts, read without delaying its first byte.

The rate comes from the counters the agent sampled before the request (``virt.writes.WriteHistory``) up to
one reading taken now. Only when those samples span less than ``MIN_SPAN_S`` (the agent or the VM started
a moment ago) is the rate measured, for what the samples lack up to ``MEASURE_WRITES_S``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.migration.mirrors.hotdisk import WINDOW_S
from agent.virt.host import VirtHost
from agent.virt.writes import WriteHistory, WriteSample

#: A write rate read over a shorter span than this is not trusted.
MIN_SPAN_S = 1.0
#: Without enough samples from before, the rate is measured over this long (the pause issue 16 added to every
#: capped move).
MEASURE_WRITES_S = 1.5


@dataclass(frozen=True)
class GuestWrites:
    """The counters of the moving disks, oldest first and the latest taken when asked; ``waited_s``: how long
    the copy was held to measure them (0 when the samples from before sufficed)."""

    samples: list[WriteSample]
    waited_s: float = 0.0

    @property
    def written(self) -> dict[str, int]:
        """Each disk's bytes written so far (the latest reading)."""
        return dict(self.samples[-1].written)

    @property
    def span_s(self) -> float:
        return self.samples[-1].at - self.samples[0].at

    def figures(self) -> dict[str, float]:
        """For the task's details (``guestWrites``): the span the rates were read over, and the pause."""
        return {"spanSeconds": round(self.span_s, 2), "heldSeconds": round(self.waited_s, 2)}

    def rates(self) -> dict[str, float]:
        """Each disk's write rate in bytes/s over the samples (empty with one sample only)."""
        if self.span_s <= 0:
            return {}
        first, last = self.samples[0].written, self.samples[-1].written
        return {d: max(0, last[d] - first.get(d, last[d])) / self.span_s for d in last}


async def read_guest_writes(
    host: VirtHost,
    history: WriteHistory | None,
    vm_uuid: str,
    disks: Sequence[str],
    *,
    with_rate: bool,
) -> GuestWrites:
    """The moving disks' counters now and, ``with_rate`` (a capped task), the samples from before that give
    their write rate; waits only when those span less than ``MIN_SPAN_S``."""
    now = WriteSample(time.monotonic(), await host.block_writes(vm_uuid, disks))
    if not with_rate:
        return GuestWrites([now])
    before = [] if history is None else history.samples(vm_uuid, disks)
    # Only samples within the watch's window, and none a restarted VM's counters would contradict.
    kept = [
        s
        for s in before
        if now.at - WINDOW_S <= s.at < now.at and all(s.written[d] <= now.written[d] for d in disks)
    ]
    samples = [*kept, now]
    span = now.at - samples[0].at
    if span >= MIN_SPAN_S:
        return GuestWrites(samples)
    wait = MEASURE_WRITES_S - span
    await asyncio.sleep(wait)
    samples.append(WriteSample(time.monotonic(), await host.block_writes(vm_uuid, disks)))
    return GuestWrites(samples, waited_s=wait)
