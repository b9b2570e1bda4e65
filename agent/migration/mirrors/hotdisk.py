"""Hot disks: a guest writing a disk faster than its mirror's share of the budget (pure logic, unit tested).

A background mirror (QEMU ``copy-mode: background``) copies dirty clusters at the speed it is given, so a
disk the guest writes faster than that never converges: the mirror's remaining bytes stop falling. In
write-blocking mode (libvirt 8.0+ ``VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES`` and
``VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES``, QEMU ``copy-mode: write-blocking``) every guest write reaches
both sides before it completes, so the mirror converges and the background copy can keep to its share; the
guest's writes then cross at the guest's pace.
QEMU 7.2 cannot switch a running job (``block-job-change`` came in 8.2): a mirror is started in one mode.

Measured (lab, QEMU 7.2, same host): in write-blocking mode a job's ``cur`` and ``end`` both grow by the
guest's writes (QEMU counts the active copies as progress), so the background part is ``cur`` minus what the
guest wrote since the job started.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConvergenceFailed
from agent.units import MiB

#: Rates and trends are read over this window of samples.
WINDOW_S = 4.0
#: A background mirror whose remaining bytes reached no new low for this long, with the guest writing at
#: least ``LOSING_WRITE_SHARE`` of its share, cannot converge at that share.
JUDGE_AFTER_S = 6.0
LOSING_WRITE_SHARE = 0.8
#: ``auto`` starts a disk's mirror in write-blocking mode when the guest writes it at this fraction of the
#: disk's share or more: a background copy would spend most of its share on rewrites, or never finish.
WRITE_BLOCKING_AT = 0.5
#: In write-blocking mode the background copy gets what the guest's writes leave of the budget while that is
#: at least this fraction of it (the budget holds). Below, the guest's writes take the task over its cap
#: whatever the copy does, and every second of the move adds to the excess: the background copy then takes
#: the whole budget, the shortest time over it (libvirt's write-blocking mode does the same), and the result
#: says so (``OVER_BUDGET``). A READY write-blocking mirror keeps this fraction of an equal share.
MIN_BACKGROUND = 0.25
#: A task whose real bytes crossed at more than this times its cap says so in its result.
OVER_BUDGET = 1.10
#: QEMU's rate limiter lets a mirror's first buffer go at once (16 MiB in the lab): that much per mirror is
#: not held against the cap, or a move of a few seconds reads as several times over it (measured: a quiet
#: 1.6 s same-host move at 5 x).
BUFFER_SLACK = 16 * MiB
#: A new low of the remaining bytes must be this much under the previous one to count.
GAIN_MIN_BYTES = 1 * MiB


class Mode(enum.StrEnum):
    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"


class Trend(enum.StrEnum):
    GAINING = "gaining"
    LOSING = "losing"
    UNKNOWN = "unknown"  # not watched long enough yet


@dataclass
class DiskWatch:
    """One mirrored disk: the guest's bytes written (block stats ``wr_bytes``) and the mirror's bytes left,
    sampled every tick. A mirror gains while its remaining bytes keep reaching new lows; QEMU reports
    progress a buffer at a time, so single samples going up or down say nothing."""

    target: str
    mode: Mode = Mode.BACKGROUND
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)
    watched_since: float | None = None
    lowest: int | None = None
    lowest_at: float = 0.0

    def observe(self, now: float, written: int, remaining: int) -> None:
        self.samples.append((now, written, remaining))
        while len(self.samples) > 2 and self.samples[1][0] <= now - WINDOW_S:
            self.samples.popleft()
        if self.watched_since is None:
            self.watched_since = now
        if self.lowest is None or remaining < self.lowest - GAIN_MIN_BYTES or remaining <= GAIN_MIN_BYTES:
            self.lowest, self.lowest_at = remaining, now

    def restart(self, mode: Mode) -> None:
        """A new mirror of this disk: its remaining bytes start over; the write rate stays known."""
        self.mode = mode
        self.lowest = None
        self.watched_since = None
        if self.samples:
            self.samples = deque([self.samples[-1]])

    @property
    def span_s(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0

    @property
    def write_bps(self) -> float:
        """The guest's write rate on this disk over the window (0 until two samples)."""
        if self.span_s <= 0:
            return 0.0
        return max(0, self.samples[-1][1] - self.samples[0][1]) / self.span_s

    @property
    def trend(self) -> Trend:
        if not self.samples or self.watched_since is None:
            return Trend.UNKNOWN
        now = self.samples[-1][0]
        if now - self.lowest_at >= WINDOW_S:
            return Trend.LOSING
        if now - self.watched_since < WINDOW_S:
            return Trend.UNKNOWN
        return Trend.GAINING

    def losing_for(self, now: float) -> float:
        """Seconds since the mirror's remaining bytes last reached a new low."""
        return 0.0 if self.lowest is None else now - self.lowest_at

    def figures(self, share: int | None) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "guestWriteBytesPerSecond": int(self.write_bps),
            "shareBytesPerSecond": share,
            "remainingBytes": self.samples[-1][2] if self.samples else None,
            "trend": self.trend.value,
        }


def start_write_blocking(write_bps: float, share: int | None) -> bool:
    """Whether ``auto`` starts this disk's mirror in write-blocking mode, from the write rate measured
    before the copy. No cap: a background mirror runs as fast as the storage and converges."""
    return share is not None and write_bps >= WRITE_BLOCKING_AT * share


def cannot_converge(watch: DiskWatch, share: int | None, now: float) -> bool:
    """A background mirror seen losing for ``JUDGE_AFTER_S`` while the guest writes near its share."""
    return (
        share is not None
        and watch.mode is Mode.BACKGROUND
        and watch.losing_for(now) >= JUDGE_AFTER_S
        and watch.write_bps >= LOSING_WRITE_SHARE * share
    )


def background_budget(budget: int, charged: float) -> int:
    """What ``budget`` leaves the background copies once the guest's ``charged`` writes are counted: the
    rest while it is at least ``MIN_BACKGROUND`` of the budget, else the whole budget (see there)."""
    left = budget - charged
    return int(left) if left >= MIN_BACKGROUND * budget else budget


def disk_shares(
    budget: int | None, watches: Mapping[str, DiskWatch], ready: set[str]
) -> dict[str, int | None]:
    """Each mirror's background speed under one budget.

    The guest's own writes are charged first: a write-blocking disk's writes cross at the guest's pace, and
    a READY background mirror must copy what the guest writes to stay in step. What is left is split equally
    among the mirrors still copying (``background_budget``: all of it once the guest alone goes over)."""
    if not watches:
        return {}
    if budget is None:
        return {name: None for name in watches}
    moving = [t for t in watches if t not in ready] or list(watches)
    charged = sum(w.write_bps for t, w in watches.items() if w.mode is Mode.WRITE_BLOCKING or t in ready)
    equal = budget / len(moving)
    each = background_budget(budget, charged) / len(moving)
    shares: dict[str, int | None] = {}
    for target, watch in watches.items():
        if target in moving:
            shares[target] = max(int(each), 1)
        elif watch.mode is Mode.BACKGROUND:  # READY: keep up with the guest's writes, within the budget
            shares[target] = int(min(max(1.25 * watch.write_bps, MiB), budget))
        else:  # READY and write-blocking: nothing left to copy in the background
            shares[target] = max(int(MIN_BACKGROUND * equal), 1)
    return shares


def disk_verdict(
    watch: DiskWatch, share: int, budget: int, disks: int, *, hint: str | None = None
) -> ConvergenceFailed:
    """The early failure of ``precopy`` for a disk whose background mirror cannot converge, with figures."""
    write = watch.write_bps
    need = int(write * 1.25 * disks)
    return ConvergenceFailed(
        f"disk {watch.target} cannot converge with a background mirror: the guest writes it at "
        f"{write / MiB:.1f} MiB/s, its share of the budget is {share / MiB:.1f} MiB/s",
        details=(
            f"disk {watch.target}: guest writes {write / MiB:.1f} MiB/s, share {share / MiB:.1f} MiB/s of "
            f"{budget / MiB:.1f} MiB/s over {disks} disk(s), remaining bytes not falling for "
            f"{JUDGE_AFTER_S:.0f} s; a background copy needs a budget above {need / MiB:.0f} MiB/s, or use "
            "strategy auto (write-blocking mirror: the guest's writes reach both sides before they complete)"
            + (f"; {hint}" if hint else "")
        ),
        disk=watch.target,
        guestWriteBytesPerSecond=int(write),
        shareBytesPerSecond=share,
        budgetBytesPerSecond=budget,
        budgetNeededBytesPerSecond=need,
    )


@dataclass
class BudgetMeter:
    """Real bytes that crossed to the destination: background copy plus guest writes in write-blocking
    mode, over the time the mirrors ran."""

    started: float | None = None
    last: float | None = None
    bytes: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def start(self, now: float) -> None:
        """The mirrors start now: bytes they move before the first sample count from here."""
        if self.started is None:
            self.started = now

    def add(self, now: float, moved: int) -> None:
        if self.started is None:
            self.started = now
        self.last = now
        self.bytes += max(0, moved)

    @property
    def rate(self) -> float:
        if self.started is None or self.last is None or self.last <= self.started:
            return 0.0
        return self.bytes / (self.last - self.started)

    def over(self, budget: int | None, mirrors: int = 1) -> bool:
        """Whether the real bytes went more than 10 % over the cap, one buffer per mirror aside."""
        if budget is None or self.started is None or self.last is None or self.last <= self.started:
            return False
        beyond = self.bytes - BUFFER_SLACK * mirrors
        return beyond > OVER_BUDGET * budget * (self.last - self.started)


def over_budget_note(meter: BudgetMeter, budget: int, watches: Mapping[str, DiskWatch]) -> dict[str, Any]:
    """What the result says when the real-bytes rate went over the cap, and why."""
    writes = {t: int(w.write_bps) for t, w in watches.items()}
    blocking = [t for t, w in watches.items() if w.mode is Mode.WRITE_BLOCKING]
    return {
        "message": (
            f"real bytes crossed at {meter.rate / MiB:.1f} MiB/s, {meter.rate / budget:.2f} x the cap of "
            f"{budget / MiB:.1f} MiB/s"
            + (
                f": the guest's own writes to {', '.join(blocking)} (write-blocking) cross at its pace"
                if blocking
                else ""
            )
        ),
        "realBytesPerSecond": int(meter.rate),
        "capBytesPerSecond": budget,
        "guestWriteBytesPerSecond": writes,
        "writeBlocking": blocking,
    }
