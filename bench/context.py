"""What every case gets: the lab, the callback receiver, the mode's settings, and places for raw data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.labenv import Lab
from labkit.mgmtplane import CallbackRecorder


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one mode. Quick: a few minutes, fewer repetitions; full: 3+ repetitions."""

    mode: str
    # 1. same-host move of one allocated volume
    same_reps: int
    same_fill_mib: int
    # 2. thin disks under one cap
    cap_reps: int
    cap_disks: int
    cap_fill_mib: int
    cap_mib_s: int
    # 3. cross-host transfer of one layer
    layer_reps: int
    layer_mib: int
    # 4. live migration at several dirty rates
    live_reps: int
    dirty_rates: tuple[int, ...]
    live_bandwidth: int
    live_downtime_ms: int
    live_timeout_s: int
    # 5. overhead
    idle_s: float
    load_fill_mib: int
    load_cap_mib_s: int
    load_rps: float


QUICK = Settings(
    mode="quick",
    same_reps=2,
    same_fill_mib=2047,  # labkit's filler is one qemu-io write: at most 2 GiB - 512 bytes
    cap_reps=1,
    cap_disks=3,
    cap_fill_mib=128,
    cap_mib_s=50,
    layer_reps=2,
    layer_mib=1024,
    live_reps=1,
    dirty_rates=(0, 16),
    live_bandwidth=20,
    live_downtime_ms=300,
    live_timeout_s=60,
    idle_s=10,
    load_fill_mib=64,
    load_cap_mib_s=8,
    load_rps=20,
)

FULL = Settings(
    mode="full",
    same_reps=5,
    same_fill_mib=2047,
    cap_reps=3,
    cap_disks=3,
    cap_fill_mib=192,
    cap_mib_s=50,
    layer_reps=3,
    layer_mib=2048,
    live_reps=2,
    dirty_rates=(0, 8, 16, 32),
    live_bandwidth=20,
    live_downtime_ms=300,
    live_timeout_s=120,
    idle_s=30,
    load_fill_mib=128,
    load_cap_mib_s=8,
    load_rps=20,
)


@dataclass
class CpuUse:
    """Agent CPU seconds spent on one migration of ``bytes_moved`` real bytes (case 5 reads these)."""

    case: str
    kind: str  # "same-host" or "cross-host"
    own_s: float  # the agent processes themselves (both agents for cross-host)
    children_s: float  # their reaped child processes (qemu-img ...)
    bytes_moved: int
    busy_tasks: int  # other tasks (teammates') running at the time: noise


@dataclass
class Context:
    lab: Lab
    receiver: CallbackRecorder
    settings: Settings
    raw: dict[str, Any] = field(default_factory=dict)  # per case, for the JSON file
    cpu: list[CpuUse] = field(default_factory=list)
    plot_runs: dict[str, Any] = field(default_factory=dict)  # live-migration series for the plot
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # file name -> draw it there
