"""What one run saw of the guest: its console after the run's mark (stale pages, kernel deaths), whether the
memory checker and the disk writers go on afterwards, and where the domain runs."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.labenv import Host, Lab
from labkit import memcheck
from labkit.guestdir import console_path, read_acks

#: What a guest kernel that died prints on its console (as the lab tests look for it).
PANIC_SIGNS = ("Kernel panic", "BUG: kernel", "Oops:", "kernel tried to execute")
_FAILED = re.compile(r"KSA-MEM FAILED (\d+) ")
_DOWNTIME = re.compile(r"Total downtime:\s+(\d+)\s*ms")


@dataclass
class Outcome:
    """One migration of one cell."""

    cell: str
    run: int
    guest: str
    src: str
    dst: str
    verdict: str  # "moved" or "stayed": what virsh's exit code or the task's final state says
    detail: str  # virsh's error, or the task's state and error code
    runs_on: list[str] = field(default_factory=list)  # hosts where the domain runs afterwards
    stale_pages: int = 0
    stale_lines: list[str] = field(default_factory=list)
    death_lines: list[str] = field(default_factory=list)
    checker_ok_after: bool = False  # a new `KSA-MEM ok` after the run, no inconsistency
    checked_after: int = 0
    writes_after: bool = False  # the disk writers acknowledged new records after the run
    downtime_ms: float | None = None
    seconds: float = 0.0
    calls: list[tuple[float, str]] = field(default_factory=list)  # (s since the start, what was called)
    console_pieces: list[str] = field(default_factory=list)  # console.log.N rotated off (virtlogd max_size)

    @property
    def verdict_true(self) -> bool:
        want = self.dst if self.verdict == "moved" else self.src
        return self.runs_on == [want]

    @property
    def harmed(self) -> bool:
        return bool(
            self.stale_pages or self.death_lines or not self.checker_ok_after or not self.writes_after
        )

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "verdictTrue": self.verdict_true, "harmed": self.harmed}


def running_on(lab: Lab, name: str, within_s: float = 60) -> list[str]:
    """The hosts where the domain runs, once it runs somewhere (a failed migration may wind down first)."""
    deadline = time.monotonic() + within_s
    while True:
        found = [h.name for h in lab.hosts if h.virsh("domstate", name, check=False).strip() == "running"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def downtime_of(dst: Host, name: str) -> float | None:
    found = _DOWNTIME.search(dst.virsh("domjobinfo", "--completed", name, check=False))
    return float(found.group(1)) if found else None


def look_after(lab: Lab, outcome: Outcome, mark: int) -> None:
    """Fill in what the guest shows after the run (``mark``: the console's length before it)."""
    outcome.runs_on = running_on(lab, outcome.guest)
    after = len(memcheck.console_text(outcome.guest))
    acks_before = sum(a.count for a in read_acks(outcome.guest).values())
    try:
        report = memcheck.fresh(outcome.guest, after, timeout=15)
        outcome.checker_ok_after, outcome.checked_after = True, report.checked
    except memcheck.MemCheckError:
        outcome.checker_ok_after = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if sum(a.count for a in read_acks(outcome.guest).values()) >= acks_before + 10:
            outcome.writes_after = True
            break
        time.sleep(0.5)
    base = console_path(outcome.guest)
    outcome.console_pieces = sorted(p.name for p in base.parent.glob(base.name + ".*"))
    text = memcheck.console_text(outcome.guest)[mark:]
    problems = [m.group(0).strip() for m in memcheck.PROBLEM.finditer(text)]
    outcome.stale_lines = [p for p in problems if not p.startswith("KSA-MEM FAILED")][:20]
    counted = [int(m.group(1)) for m in _FAILED.finditer(text)]
    outcome.stale_pages = max([len(outcome.stale_lines), *counted])
    outcome.death_lines = [ln for ln in text.splitlines() if any(s in ln for s in PANIC_SIGNS)][:20]
