"""Progress accounting for one task: bytes per item, a percent that never goes backwards, speed and ETA.

Engines report absolute ``(done, total)`` per item (a volume or ``"memory"``); totals may grow late (the
memory phase of a live migration appears only after the disks) and an item's counter may restart (libvirt
counts the disk and memory phases each from zero). The tracker hides both from the user: the percent is the
highest value seen so far, held below 100 until the task is marked complete. Pure logic, no clock of its own:
every call takes ``now`` (monotonic seconds) so tests drive time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The percent shown while work remains; 100 is reserved for a task that really finished.
MAX_UNFINISHED_PERCENT = 99.9
#: Time constant of the speed average (seconds): a rate sample weighs ``1 - exp(-dt / tau)``.
SPEED_TAU_S = 5.0
#: Samples closer together than this are merged so bursts of tiny updates do not make the speed jumpy.
MIN_SAMPLE_S = 0.5


@dataclass(frozen=True)
class ItemProgress:
    """One item's counters as last reported, ``done`` clamped into ``[0, total]``."""

    name: str
    done: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 if self.total <= 0 else _floor1(100.0 * self.done / self.total)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "memory" if self.name == "memory" else "volume",
            "bytesDone": self.done,
            "bytesTotal": self.total,
            "percent": self.percent,
        }


@dataclass(frozen=True)
class ProgressSnapshot:
    """What the API shows: overall bytes, monotonic percent, smoothed speed and ETA, per-item detail."""

    percent: float
    bytes_done: int
    bytes_total: int
    bytes_per_second: float | None
    eta_seconds: float | None
    items: tuple[ItemProgress, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "bytesDone": self.bytes_done,
            "bytesTotal": self.bytes_total,
            "bytesPerSecond": None if self.bytes_per_second is None else round(self.bytes_per_second, 1),
            "etaSeconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
        }


class ProgressTracker:
    """Accumulates engine reports into a ``ProgressSnapshot``; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._items: dict[str, ItemProgress] = {}
        self._percent = 0.0
        self._complete = False
        self._speed: float | None = None
        self._sample_at: float | None = None
        self._sample_bytes = 0

    @property
    def complete(self) -> bool:
        return self._complete

    def update(self, item: str, done: int, total: int, now: float) -> int:
        """Record ``item`` at ``done`` of ``total`` bytes; return the bytes moved since its last report.

        A counter that went backwards (a phase restarted) moves nothing; the next increase counts again.
        """
        total = max(0, int(total))
        raw_done = max(0, int(done))
        previous = self._items.get(item)
        moved = 0 if previous is None else max(0, min(raw_done, total) - previous.done)
        if previous is None:
            moved = min(raw_done, total)
        self._items[item] = ItemProgress(item, min(raw_done, total), total)
        self._account_speed(moved, now)
        self._raise_percent()
        return moved

    def mark_complete(self) -> None:
        """The task succeeded: the percent may reach 100 now, and only now."""
        self._complete = True
        self._percent = 100.0

    def restore(self, items: Mapping[str, tuple[int, int]], percent: float) -> None:
        """Seed the tracker from a journalled snapshot (agent restart): the percent keeps its floor."""
        for name, (done, total) in items.items():
            total = max(0, int(total))
            self._items[name] = ItemProgress(name, min(max(0, int(done)), total), total)
        self._percent = min(max(self._percent, float(percent)), MAX_UNFINISHED_PERCENT)
        self._raise_percent()

    def snapshot(self) -> ProgressSnapshot:
        done = sum(item.done for item in self._items.values())
        total = sum(item.total for item in self._items.values())
        eta: float | None
        if self._complete:
            eta = 0.0
        elif self._speed is not None and self._speed > 0 and total > 0:
            eta = max(0.0, (total - done) / self._speed)
        else:
            eta = None
        return ProgressSnapshot(
            percent=self._percent,
            bytes_done=done,
            bytes_total=total,
            bytes_per_second=self._speed,
            eta_seconds=eta,
            items=tuple(self._items.values()),
        )

    def _raise_percent(self) -> None:
        if self._complete:
            return
        total = sum(item.total for item in self._items.values())
        if total <= 0:
            return
        done = sum(item.done for item in self._items.values())
        raw = min(_floor1(100.0 * done / total), MAX_UNFINISHED_PERCENT)
        self._percent = max(self._percent, raw)

    def _account_speed(self, moved: int, now: float) -> None:
        if self._sample_at is None:
            self._sample_at = now
            self._sample_bytes = 0
            return
        self._sample_bytes += moved
        dt = now - self._sample_at
        if dt < MIN_SAMPLE_S:
            return
        rate = self._sample_bytes / dt
        weight = 1.0 - math.exp(-dt / SPEED_TAU_S)
        self._speed = rate if self._speed is None else self._speed + weight * (rate - self._speed)
        self._sample_at = now
        self._sample_bytes = 0


def _floor1(value: float) -> float:
    """Floor to one decimal so 99.96 shows as 99.9, never rounded up to 100.0."""
    return math.floor(value * 10.0) / 10.0
