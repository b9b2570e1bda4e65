"""What a lab host sent on its wire, read where it crosses: its network namespace's ``eth0`` counters
(``ip -s link``), not an agent's figures. Used by the lab tests and benchmarks that hold moves to a budget."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Self

from labkit.labview import LabHost
from labkit.layout import host_by_name

#: The window a rate is judged over (s).
WINDOW_S = 5.0


class LinkCounter:
    """Samples the bytes a lab host sent on its wire (its namespace's ``eth0``), every ``every_s``."""

    def __init__(self, host: LabHost, every_s: float = 0.25) -> None:
        self.netns = host_by_name(host.name).netns
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sent(self) -> int:
        out = subprocess.run(
            ["ip", "-n", self.netns, "-s", "-j", "link", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.sent()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def windows(self, since: float, until: float) -> list[tuple[float, float]]:
        """(end of the window, bytes/s) of every ``WINDOW_S`` window from ``since + WINDOW_S`` (past the
        first) to ``until``."""
        inside = [(t, b) for t, b in self.samples if since <= t <= until]
        out = []
        for t1, b1 in inside:
            earlier = [(t, b) for t, b in inside if t <= t1 - WINDOW_S]
            if earlier and t1 - since >= 2 * WINDOW_S - self.every_s:
                t0, b0 = earlier[-1]
                out.append((t1 - since, (b1 - b0) / (t1 - t0)))
        return out
