"""The guest's memory checker as the host sees it: its `KSA-MEM` lines on the serial console.

The checker (memcheck.c, started by guest_init.sh) verifies and rewrites its pages in a loop and prints
`KSA-MEM ok <pages checked>` every 2 s while every page held the generation it expected, and
`KSA-MEM STALE ...` / `KSA-MEM BAD ...` for an inconsistent page. After a live migration the proof that
memory arrived whole is: no inconsistency anywhere on the console, and new `ok` lines after the switchover
(the checker still runs, on the host where the guest now runs). ``fresh`` waits for exactly that.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from . import domain
from .guestdir import GuestRecord, read_console
from .sysutil import LabError

#: A whole `ok` line (kernel output can cut into a console line: only whole lines count as proof).
OK = re.compile(r"^KSA-MEM ok (\d+)\s*$", re.MULTILINE)
#: An inconsistency, wherever it shows (a cut line still counts against the guest).
PROBLEM = re.compile(r"KSA-MEM (?:STALE|BAD|FAILED)[^\n]*")
START = re.compile(r"^KSA-MEM start pages=(\d+) mib_s=(\d+) page0=0x([0-9a-f]+) page1=0x([0-9a-f]+)", re.M)
EVERY_S = 2  # the checker's report interval (guest_init.sh)


class MemCheckError(LabError):
    """The guest's memory checker saw an inconsistent page, or stopped reporting."""


@dataclass
class MemReport:
    name: str
    checked: int = 0  # pages checked, by the last `ok` line after the mark
    oks: int = 0  # `ok` lines after the mark
    starts: int = 0  # checker starts on the whole console (one per boot)
    problems: list[str] = field(default_factory=list)  # STALE / BAD / FAILED lines, whole console
    page_addresses: tuple[int, int] | None = None  # guest-physical addresses of pages 0 and 1 (last start)
    running_on: list[str] = field(default_factory=list)  # lab hosts where the domain runs (when read)

    def describe(self) -> str:
        where = ", ".join(self.running_on) or "no host"
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return f"{self.name}: memory checker: {self.problems[0]}{more}; the domain runs on {where}"
        return f"{self.name}: memory checker ok, {self.checked} pages checked (the domain runs on {where})"


def enabled(name: str) -> bool:
    record = GuestRecord.load(name)
    return record is not None and record.mem_check_mib > 0


def console_text(name: str) -> str:
    return read_console(name)


def read(name: str, text: str, since: int = 0) -> MemReport:
    """What the console ``text`` says: inconsistencies anywhere, `ok` lines after offset ``since``."""
    report = MemReport(name=name)
    report.problems = [m.group(0).strip() for m in PROBLEM.finditer(text)]
    starts = list(START.finditer(text))
    report.starts = len(starts)
    if starts:
        report.page_addresses = (int(starts[-1].group(3), 16), int(starts[-1].group(4), 16))
    tail = text[since:]
    if since and text[since - 1 : since] != "\n":
        tail = tail.partition("\n")[2]  # the line the mark cut is not after the mark
    oks = OK.findall(tail)
    report.oks = len(oks)
    report.checked = int(oks[-1]) if oks else 0
    return report


def mark(name: str) -> int:
    """A position on the guest's console: `ok` lines after it are news (see ``fresh``)."""
    return len(console_text(name))


def fresh(name: str, since: int, timeout: float = 3 * EVERY_S + 4) -> MemReport:
    """Wait until the checker printed a new `ok` line after ``since`` (a ``mark``), with no inconsistency
    anywhere on the console; raise MemCheckError naming the first inconsistency, or saying it stopped."""
    deadline = time.monotonic() + timeout
    while True:
        report = read(name, console_text(name), since)
        if report.problems or report.oks or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    report.running_on = [p.host.name for p in domain.placements(name) if p.state == "running"]
    if report.problems:
        raise MemCheckError(report.describe())
    if not report.oks:
        raise MemCheckError(
            f"{name}: the memory checker stopped reporting: no `KSA-MEM ok` in {timeout:.0f} s"
            f" ({report.starts} checker start(s) on the console; the domain runs on"
            f" {', '.join(report.running_on) or 'no host'})"
        )
    return report
