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

import itertools
import json
import os
import statistics
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


def qemu_jobs(host: LabHost, vm: str) -> list[dict[str, int]]:
    """The block jobs of ``vm`` as its QEMU reports them (``query-block-jobs``); empty once it is gone."""
    jobs = _qmp(host, vm, "query-block-jobs")
    return [dict(j) for j in jobs] if isinstance(jobs, list) else []


def qemu_moved(host: LabHost, vm: str) -> Callable[[], dict[str, int] | None]:
    """Bytes the source QEMU has sent so far, per stream: ``ram`` and each mirror job (by its device), or
    None once it is gone."""

    def read() -> dict[str, int] | None:
        jobs = _qmp(host, vm, "query-block-jobs")
        mig = _qmp(host, vm, "query-migrate")
        if not isinstance(jobs, list) or not isinstance(mig, dict):
            return None
        moved = {str(j["device"]): int(j["offset"]) for j in jobs}
        moved.update({SPEED + str(j["device"]): int(j.get("speed", 0)) for j in jobs})
        moved["ram"] = int((mig.get("ram") or {}).get("transferred", 0))
        return moved

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


def files_allocated(root: Path, before: Iterable[str]) -> Callable[[], dict[str, int] | None]:
    """Bytes allocated by each file that appeared in ``root`` since ``before`` (its listing then)."""
    old = set(before)

    def read() -> dict[str, int] | None:
        sizes: dict[str, int] = {}
        for name in set(os.listdir(root)) - old:
            try:
                sizes[name] = os.stat(root / name).st_blocks * 512
            except FileNotFoundError:
                continue
        return sizes

    return read


#: A step of at least this in a mirror's counter is one of its bursts: QEMU 7.2's mirror copies up to its
#: buffer (16 MiB) at once and then sleeps as long as its speed requires (seen in the lab: offsets step by
#: 16 MiB, every 8 s at 2 MiB/s).
BURST = 1024 * 1024
BURST_GAP_S = 0.5
#: The readings of a mirror's speed in effect ride along under this prefix (not bytes: never summed).
SPEED = "speed:"


@dataclass
class Sampler:
    """Reads ``read()`` (bytes per stream) every ``every`` seconds in a thread, until the block ends."""

    read: Callable[[], dict[str, int] | None]
    every: float = 0.1
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
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
            asked = time.monotonic()
            moved = self.read()
            if moved is not None:
                # A reading is timed at the middle of the calls that took it: a `virsh` call over TLS lasts
                # 0.05-0.3 s on a loaded machine, and timing it at its end put that jitter into every rate.
                self.samples.append(((asked + time.monotonic()) / 2, moved))
            self._stop.wait(self.every)

    def _series(self, stream: str | None) -> list[tuple[float, int]]:
        """(time, bytes) of one stream, or of all of them together (None)."""
        samples = list(self.samples)
        if stream is None:
            return [(t, sum(v for k, v in m.items() if not k.startswith(SPEED))) for t, m in samples]
        return [(t, m[stream]) for t, m in samples if stream in m]

    def streams(self) -> set[str]:
        return {name for _t, m in list(self.samples) for name in m if not name.startswith(SPEED)}

    def mean_speed(self, stream: str, start: float, end: float) -> float | None:
        """The mean of the speed QEMU reported for a mirror over [start, end] (None: not read)."""
        speeds = [v for t, v in self._series(SPEED + stream) if start <= t <= end]
        return sum(speeds) / len(speeds) if speeds else None

    def rate(self, start: float, end: float, stream: str | None = None) -> float:
        """Bytes/s over [start, end]: the least-squares slope of every sample in it, not the first and the
        last alone (whose times carry the jitter of the calls that read them); a loaded machine may leave
        only two readings in a short window."""
        window = [s for s in self._series(stream) if start <= s[0] <= end]
        assert len(window) >= 2, f"fewer than two samples in [{start:.2f}, {end:.2f}]: {self.samples[-3:]}"
        times, moved = zip(*window, strict=True)
        return statistics.linear_regression(times, moved).slope

    def rate_until_done(self, start: float, end: float) -> float:
        """Bytes/s (all streams) from the last sample at or before ``start`` until the transfer stopped (the
        first sample within 1 % of the last one up to ``end``): an uncapped transfer may end within a sample
        or two, and counting from before ``start`` only underestimates it."""
        series = self._series(None)
        before = [s for s in series if s[0] <= start]
        after = [s for s in series if start < s[0] <= end]
        assert before and after, f"no samples around {start:.2f}: {self.samples[-3:]}"
        t0, b0 = before[-1]
        last = after[-1][1]
        t1, b1 = next(s for s in after if s[1] >= b0 + 0.99 * (last - b0))
        return (b1 - b0) / (t1 - t0)

    def bursts(self, stream: str, after: float) -> list[tuple[float, int]]:
        """The bursts of ``stream`` after ``after``: (when the step began, the bytes once it was over). Steps
        less than ``BURST_GAP_S`` apart are one burst (its requests complete over a few samples)."""
        series = self._series(stream)
        out: list[tuple[float, int]] = []
        last_step = -1.0
        for (_t0, b0), (t, b) in itertools.pairwise(series):
            if t <= after or b - b0 < BURST:
                continue
            if out and t - last_step < BURST_GAP_S:
                out[-1] = (out[-1][0], b)
            else:
                out.append((t, b))
            last_step = t
        return out

    def burst_rate(self, stream: str, after: float, *, skip: int = 0) -> tuple[float, float, float]:
        """(when the first burst after ``after`` began, the rate from its end to the end of the last burst
        seen, over the time between their beginnings): the rate a bursting mirror holds; the first burst
        after a change is not counted (QEMU charges it against the sleep that follows). ``skip``: bursts
        after ``after`` left out before the first."""
        steps = self.bursts(stream, after)[skip:]
        assert len(steps) >= 2, f"{stream}: under two bursts after {after:.2f} (skipping {skip}): {steps}"
        (t0, b0), (t1, b1) = steps[0], steps[-1]
        return t0, t1, (b1 - b0) / (t1 - t0)

    def wait_until(self, what: str, predicate: Callable[[int], bool], timeout: float) -> float:
        """Wait for the first new sample whose total ``predicate(bytes)`` holds; returns its time."""
        seen = len(self.samples)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, moved in list(self.samples)[seen:]:
                if predicate(sum(moved.values())):
                    return at
            time.sleep(0.02)
        raise AssertionError(f"never saw {what} within {timeout} s (last: {self.samples[-1:]})")

    def wait_for_bursts(self, streams: Iterable[str], after: float, count: int, timeout: float) -> None:
        """Wait until every stream stepped ``count`` times after ``after``."""
        deadline = time.monotonic() + timeout
        names = list(streams)
        while not all(len(self.bursts(n, after)) >= count for n in names):
            assert time.monotonic() < deadline, {n: self.bursts(n, after) for n in names}
            time.sleep(0.1)
