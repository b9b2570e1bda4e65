"""One bandwidth budget for a whole task, charged for real bytes (pure logic, unit tested).

A mirror's rate limit applies to each job on its own, and how it is charged depends on the copy:

- A full copy (libvirt's block copy of a disk, which libvirt never makes shallow for a disk without a
  backing file, and a migration that flattens a chain) marks the whole disk dirty when the target cannot
  write zeroes by unmapping, and charges holes like data (LAB-NOTES, libvirt 9.0 / QEMU 7.2: a 1 GiB disk
  with 200 MiB allocated takes 20.6 s at 50 MiB/s). QEMU walks it in disk order, ``cur`` close to its
  position. So every tick we look ahead in the source's allocation map: the stretch of disk that holds the
  next ``share * horizon`` real bytes is what the job may cross, and its length per second is the speed we
  set. Holes are crossed fast; data moves at the job's share of the budget.
- A shallow migration mirror (QEMU ``sync: top``) marks only the allocated clusters: ``cur`` and ``end``
  count real bytes and the speed is simply the share.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

UNLIMITED_SPEED = 8 * 1024**3  # bytes/s; QEMU takes 0 as "no limit", but we keep a finite figure to steer


class AllocationIndex:
    """Sorted data extents of a disk with prefix sums: real bytes below an offset, and the reverse."""

    def __init__(self, extents: Iterable[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for start, length in sorted(e for e in extents if e[1] > 0):
            if merged and start <= merged[-1][0] + merged[-1][1]:
                last_start, last_len = merged[-1]
                merged[-1] = (last_start, max(last_len, start + length - last_start))
            else:
                merged.append((start, length))
        self._starts = [s for s, _ in merged]
        self._ends = [s + n for s, n in merged]
        self._prefix = [0]
        for _s, n in merged:
            self._prefix.append(self._prefix[-1] + n)

    @property
    def total(self) -> int:
        return self._prefix[-1]

    @property
    def end(self) -> int:
        """The offset just past the last data byte (0 for a disk without data)."""
        return self._ends[-1] if self._ends else 0

    def below(self, offset: int) -> int:
        """Real bytes in [0, offset)."""
        i = bisect.bisect_right(self._starts, offset)
        if i == 0:
            return 0
        return self._prefix[i - 1] + min(offset, self._ends[i - 1]) - self._starts[i - 1]

    def offset_after(self, offset: int, real_bytes: int) -> int | None:
        """The smallest X with ``below(X) - below(offset) >= real_bytes``; None when the data ends first."""
        target = self.below(offset) + real_bytes
        if target > self.total:
            return None
        i = bisect.bisect_left(self._prefix, target)  # prefix[i] >= target
        if i == 0:
            return offset
        k = i - 1  # the extent in which the target byte lies
        return max(offset, self._starts[k] + (target - self._prefix[k]))


@dataclass(frozen=True)
class MirrorSample:
    """What libvirt says of one mirror job, plus the index of its source data."""

    cur: int
    end: int
    virtual_size: int
    index: AllocationIndex
    ready: bool

    @property
    def positional(self) -> bool:
        """Whether the job walks the whole disk, holes charged, with ``cur`` a position in it: a full copy,
        or a shallow one of a disk whose holes an earlier full copy filled with zero clusters (they count as
        allocated). Otherwise ``end`` counts the real bytes QEMU marked to copy."""
        return self.end >= self.virtual_size * 0.9


def real_bytes_done(sample: MirrorSample) -> tuple[int, int]:
    """(done, total) in real bytes for a mirror job.

    When ``end`` spans the virtual size, ``cur`` is a position: real bytes are the data below it. When
    ``end`` is well below the virtual size (QEMU already skipped holes), ``cur`` counts real bytes. Guest
    writes during the copy grow ``end`` beyond the first pass; they are real bytes too.
    """
    if sample.positional:
        first_pass_end = sample.virtual_size
        done = sample.index.below(min(sample.cur, first_pass_end))
        extra_total = max(0, sample.end - first_pass_end)
        extra_done = max(0, sample.cur - first_pass_end)
        total = sample.index.total + extra_total
        done += extra_done
    else:
        total, done = sample.end, sample.cur
    if sample.ready:
        done = total
    return min(done, total), total


#: Plan each speed for this many ticks ahead. The job is re-steered every tick, so it only ever covers the
#: first part of the planned stretch: before a large hole it closes in on the data geometrically (half of the
#: way each tick) instead of racing into it at hole speed when the next tick comes late (up to twice late).
HORIZON_TICKS = 2.0


def job_speed(sample: MirrorSample, share: int | None, horizon_s: float) -> int:
    """Bytes/s of virtual progress to allow so the job moves about ``share`` real bytes/s over the next
    ``horizon_s`` seconds: how long this speed may stay in effect before a newer one is sure to (see
    ``SteeringClock``)."""
    if share is None:
        return 0  # no limit
    if sample.ready or not sample.positional:
        return share
    index = sample.index
    ahead = index.offset_after(sample.cur, int(share * horizon_s))
    if ahead is not None:
        seconds = horizon_s
    else:  # less data left than the horizon's worth: through it at the share, then at once
        left = index.total - index.below(sample.cur)
        if left <= 0:
            # Past the data: holes to the end of the first pass, crossed at once; past the first pass the
            # job copies what the guest wrote meanwhile, real bytes charged at the share (an unlimited speed
            # here let a hot disk converge at 1.7 x the cap, silently: issue 16).
            return UNLIMITED_SPEED if sample.cur < sample.virtual_size else share
        ahead, seconds = index.end, left / share
    stretch = max(ahead - sample.cur, 0)
    return int(min(max(stretch / seconds, share), UNLIMITED_SPEED))


class SteeringClock:
    """How far ahead to plan a speed: ``HORIZON_TICKS`` ticks when a new speed is in effect at once, longer
    when it is not. A busy libvirtd answers late at times (and a connection shared with a blocking
    ``migrateToURI3`` did so by the keepalive's 5 s, see ``VirtHost.migrate``); a speed planned for half a
    second would then carry a mirror at hole-crossing speed deep into the data. Until a change has been
    timed, ``first_s`` is assumed."""

    def __init__(self, tick_s: float, first_s: float, *, keep: int = 4, margin: float = 1.5) -> None:
        self.tick_s = tick_s
        self.first_s = first_s
        self.margin = margin
        self._keep = keep
        self._latencies: list[float] = []

    def landed(self, seconds: float) -> None:
        """A speed change took ``seconds`` from the request to its answer."""
        if self._keep:
            self._latencies = [*self._latencies, seconds][-self._keep :]

    @property
    def horizon_s(self) -> float:
        floor = self.tick_s * HORIZON_TICKS
        slowest = max(self._latencies) if self._latencies else self.first_s
        return max(floor, self.margin * (slowest + self.tick_s))


#: Added to what each job has left before the budget is split: QEMU's mirror reports progress a buffer (16 MiB
#: in the lab) at a time, so a job one report behind another is not really behind, and one that has finished
#: its first pass still copies guest writes (a share of zero would stall it).
WEIGHT_SMOOTHING = 16 * 1024**2

#: A new speed within this fraction of the one in effect is not worth a call: every change restarts the
#: accounting of QEMU's rate limiter, and shares that flap with each progress report let bursts through.
SPEED_SLACK = 0.25


def split_by_remaining(budget: int | None, remaining: Mapping[str, int]) -> dict[str, int | None]:
    """Shares of one budget in proportion to the real bytes each job has left, so that they all finish
    together and the budget stays in use to the end without any further change."""
    if not remaining:
        return {}
    if budget is None:
        return {name: None for name in remaining}
    weights = {name: max(left, 0) + WEIGHT_SMOOTHING for name, left in remaining.items()}
    whole = sum(weights.values())
    return {name: max(budget * weight // whole, 1) for name, weight in weights.items()}


#: The same for a job that walks the whole disk: its hole-crossing speeds change by whole factors and must
#: land, but a speed nudged up and down by a few percent each tick kept waking QEMU's job out of its
#: rate-limit sleep (lab: data moved at twice the speed set while it flapped between 16.9 and 17.5 MB/s).
POSITIONAL_SLACK = 0.1


def worth_changing(current: int | None, new: int, slack: float = SPEED_SLACK) -> bool:
    """Whether ``new`` differs enough from the speed in effect to be set (0 means no limit)."""
    if current is None or (current == 0) != (new == 0):
        return True
    return abs(new - current) > slack * current
