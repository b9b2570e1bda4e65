"""What the controller reads: one reading of libvirt's job statistics, taken every 0.5-1 s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.units import MiB

DEFAULT_PAGE_SIZE = 4096


def _num(stats: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = stats.get(key)
    if value is None or isinstance(value, bool):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def mib(n: float) -> str:
    """Bytes as the notes show them."""
    return f"{n / MiB:.1f} MiB"


@dataclass(frozen=True)
class MigrationSample:
    """One reading of ``virDomainGetJobStats`` (bytes, bytes/s, pages/s) at monotonic ``time`` (s)."""

    time: float
    memory_iteration: int = 0
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    memory_bps: int = 0
    memory_dirty_rate: int = 0  # pages/s
    memory_page_size: int = DEFAULT_PAGE_SIZE
    downtime_ms: int | None = None  # libvirt's expected downtime while the job runs
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0
    auto_converge_throttle: int = 0
    postcopy_active: bool = False

    @classmethod
    def from_job_stats(
        cls, stats: Mapping[str, Any], now: float, *, postcopy_active: bool = False
    ) -> MigrationSample:
        """Read libvirt's keys, tolerating missing ones (older QEMU, the disk phase, a finished job)."""
        downtime = stats.get("downtime")
        return cls(
            time=now,
            memory_iteration=_num(stats, "memory_iteration"),
            memory_total=_num(stats, "memory_total"),
            memory_processed=_num(stats, "memory_processed"),
            memory_remaining=_num(stats, "memory_remaining"),
            memory_bps=_num(stats, "memory_bps"),
            memory_dirty_rate=_num(stats, "memory_dirty_rate"),
            memory_page_size=_num(stats, "memory_page_size") or DEFAULT_PAGE_SIZE,
            downtime_ms=None if downtime is None else _num(stats, "downtime"),
            disk_total=_num(stats, "disk_total"),
            disk_processed=_num(stats, "disk_processed"),
            disk_remaining=_num(stats, "disk_remaining"),
            auto_converge_throttle=_num(stats, "auto_converge_throttle"),
            postcopy_active=postcopy_active or _num(stats, "memory_postcopy_requests") > 0,
        )

    @property
    def dirty_rate_bps(self) -> int:
        return self.memory_dirty_rate * self.memory_page_size

    @property
    def in_disk_phase(self) -> bool:
        """Disk mirrors still copying and the memory phase not past its first pass: nothing to judge yet."""
        return self.memory_iteration == 0 or (self.memory_iteration <= 1 and self.disk_remaining > 0)
