"""What a move transfers per second, read from outside the agent: the source QEMU's own counters (across
hosts) or the destination files' growth (one host).

- ``qemu_moved``: ``query-migrate`` (``ram.transferred``) plus every block job's ``offset`` (shallow NBD
  mirrors count real bytes) through ``virsh qemu-monitor-command`` on the source host;
- ``files_allocated``: the bytes allocated on disk by the destination files (``st_blocks``), which a full
  block copy fills with the data only.

A ``Sampler`` thread reads one of them every ``every`` seconds; neither the agent's ``bytesDone`` nor its
details are used: the tests judge the agent by these.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from labtools import LabHost

MiB = 1024 * 1024


def _qmp(host: LabHost, vm: str, command: str) -> object:
    out = host.virsh("qemu-monitor-command", vm, json.dumps({"execute": command}), check=False, timeout=10)
    try:
        return json.loads(out).get("return")
    except (ValueError, AttributeError):
        return None


def qemu_moved(host: LabHost, vm: str) -> Callable[[], int | None]:
    """Bytes the source QEMU has sent so far (memory and disk mirrors), or None once it is gone."""

    def read() -> int | None:
        jobs = _qmp(host, vm, "query-block-jobs")
        mig = _qmp(host, vm, "query-migrate")
        if not isinstance(jobs, list) or not isinstance(mig, dict):
            return None
        ram = mig.get("ram") or {}
        return int(ram.get("transferred", 0)) + sum(int(j["offset"]) for j in jobs)

    return read


def memory_stream_started(host: LabHost, vm: str, timeout: float) -> float:
    """Wait until the source QEMU sends memory (``ram.transferred`` above 0); returns when it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mig = _qmp(host, vm, "query-migrate")
        if isinstance(mig, dict) and int((mig.get("ram") or {}).get("transferred", 0)) > 0:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"{vm}: the memory stream did not start within {timeout} s")


def files_allocated(root: Path, before: Iterable[str]) -> Callable[[], int | None]:
    """Bytes allocated by the files that appeared in ``root`` since ``before`` (its listing then)."""
    old = set(before)

    def read() -> int | None:
        total = 0
        for name in set(os.listdir(root)) - old:
            try:
                total += os.stat(root / name).st_blocks * 512
            except FileNotFoundError:
                continue
        return total

    return read


@dataclass
class Sampler:
    """Reads ``read()`` every ``every`` seconds in a thread (monotonic time, bytes), until the block ends."""

    read: Callable[[], int | None]
    every: float = 0.1
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            moved = self.read()
            if moved is not None:
                self.samples.append((time.monotonic(), moved))
            self._stop.wait(self.every)

    def rate(self, start: float, end: float) -> float:
        """Bytes/s between the first and the last sample in [start, end]."""
        window = [s for s in list(self.samples) if start <= s[0] <= end]
        assert len(window) >= 2, f"fewer than two samples in [{start:.2f}, {end:.2f}]: {self.samples[-3:]}"
        (t0, b0), (t1, b1) = window[0], window[-1]
        return (b1 - b0) / (t1 - t0)

    def rate_until_done(self, start: float, end: float) -> float:
        """Bytes/s from the last sample at or before ``start`` until the transfer stopped (the first sample
        within 1 % of the last one up to ``end``): an uncapped transfer may end within a sample or two, and
        counting from before ``start`` only underestimates it."""
        samples = list(self.samples)
        before = [s for s in samples if s[0] <= start]
        after = [s for s in samples if start < s[0] <= end]
        assert before and after, f"no samples around {start:.2f}: {samples[-3:]}"
        t0, b0 = before[-1]
        last = after[-1][1]
        t1, b1 = next(s for s in after if s[1] >= b0 + 0.99 * (last - b0))
        return (b1 - b0) / (t1 - t0)

    def wait_until(self, what: str, predicate: Callable[[int], bool], timeout: float) -> float:
        """Wait for the first new sample for which ``predicate(bytes)`` holds; returns its time."""
        seen = len(self.samples)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, moved in list(self.samples)[seen:]:
                if predicate(moved):
                    return at
            time.sleep(0.02)
        raise AssertionError(f"never saw {what} within {timeout} s (last: {self.samples[-1:]})")
