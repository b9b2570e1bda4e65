"""The control cells: plain `virsh migrate --live --p2p --copy-storage-all --auto-converge` (with TLS, the
agent's throttle steps and bandwidth), with the agent's calls replayed by hand from a thread while it runs:

- ``fixed300`` / ``fixed50``: the allowed downtime set once (migrate-setmaxdowntime) as the job starts;
- ``schedule``: 50 ms, then raised pass by pass (100, 200, 300, 500 ms at iterations 3..6), as `auto` does;
- ``drop``: that schedule, back to 50 ms at iteration 5 (what a restarted agent did before d058810), raised
  again from iteration 7;
- ``speeds``: the schedule plus `block-job-set-speed` on every block job of the migration (QMP through
  `virsh qemu-monitor-command`) every second, alternating 4 and 16 MiB/s, as the agent's disk steering does;
- ``sync-writes``: `auto`'s schedule since the floor (300 ms, then 500) with
  `--copy-storage-synchronous-writes` (the disks mirrored in write-blocking mode), on the hot-disk guest
  (``HOT_CELLS``): the control of the agent's ``auto-hotdisk``.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import threading
import time

from bench.labenv import BenchGuest, Host, Lab
from bench.safety.observe import Outcome, downtime_of
from bench.virshmigrate import create_targets, destination_xml
from labkit.virsh import virsh_argv

BANDWIDTH_MIB_S = 16
CELLS = ("fixed300", "fixed50", "schedule", "drop", "speeds", "sync-writes")
_ITERATION = re.compile(r"Iteration:\s+(\d+)")
#: iteration -> downtime (ms) set when the migration reaches it
SCHEDULE = {1: 50, 3: 100, 4: 200, 5: 300, 6: 500}
DROP = {1: 50, 3: 100, 4: 200, 5: 50, 7: 200, 8: 500}
#: `auto`'s schedule since the switchover floor (300 ms on QEMU 7.2 under TCG), up to the cells' 500 ms
FLOORED = {1: 300, 4: 500}


class Steer(threading.Thread):
    """The calls made while `virsh migrate` runs, each logged with its time."""

    def __init__(self, cell: str, src: Host, name: str, started: float, calls: list[tuple[float, str]]):
        super().__init__(daemon=True)
        self.cell, self.src, self.name, self.started, self.calls = cell, src, name, started, calls
        self.done = threading.Event()

    def call(self, *args: str) -> str:
        self.calls.append((round(time.monotonic() - self.started, 2), " ".join(args)))
        return self.src.virsh(*args, check=False)

    def iteration(self) -> int | None:
        """The migration's pass (None: no migration job yet, or any more)."""
        info = self.src.virsh("domjobinfo", self.name, check=False)
        if "Unbounded" not in info:
            return None
        found = _ITERATION.search(info)
        return int(found.group(1)) if found else 1

    def run(self) -> None:
        plan = {"fixed300": {1: 300}, "fixed50": {1: 50}, "drop": DROP, "sync-writes": FLOORED}.get(
            self.cell, SCHEDULE
        )
        done: set[int] = set()
        fast = False
        seen_job = False
        while not self.done.is_set():
            it = self.iteration()
            if it is None:
                if seen_job:
                    return
                time.sleep(0.05)
                continue
            seen_job = True
            for at, ms in sorted(plan.items()):
                if at <= it and at not in done:
                    done.add(at)
                    self.call("migrate-setmaxdowntime", self.name, str(ms))
            if self.cell == "speeds":
                self.set_speeds(16 if fast else 4)
                fast = not fast
                self.done.wait(1.0)
            else:
                self.done.wait(0.2)

    def set_speeds(self, mib_s: int) -> None:
        query = json.dumps({"execute": "query-block-jobs"})
        reply = self.src.virsh("qemu-monitor-command", self.name, query, check=False)
        try:
            jobs = json.loads(reply).get("return", [])
        except ValueError:
            return
        for job in jobs:
            command = {
                "execute": "block-job-set-speed",
                "arguments": {"device": job["device"], "speed": mib_s << 20},
            }
            self.call("qemu-monitor-command", self.name, json.dumps(command))


def migrate(lab: Lab, guest: BenchGuest, cell: str, run_no: int) -> Outcome:
    src, dst = guest.host, lab.other(guest.host)
    new_paths = create_targets(guest, dst)
    outcome = Outcome(cell, run_no, guest.name, src.name, dst.name, verdict="", detail="")
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="safety-") as xml:
        xml.write(destination_xml(src, guest.name, new_paths))
        xml.flush()
        argv = [
            *virsh_argv(src.libvirt_uri),
            "migrate",
            "--live",
            "--p2p",
            "--copy-storage-all",
            "--auto-converge",
        ]
        argv += ["--auto-converge-initial", "30", "--auto-converge-increment", "20", "--tls"]
        if cell == "sync-writes":
            argv += ["--copy-storage-synchronous-writes"]
        argv += ["--bandwidth", str(BANDWIDTH_MIB_S), "--persistent", "--undefinesource", "--abort-on-error"]
        argv += [
            "--xml",
            xml.name,
            "--persistent-xml",
            xml.name,
            "--migrateuri",
            f"tcp://{dst.migration_address}",
        ]
        argv += [guest.name, dst.libvirt_uri]
        started = time.monotonic()
        outcome.calls.append((0.0, "virsh migrate " + " ".join(argv[argv.index("migrate") + 1 :])))
        steer = Steer(cell, src, guest.name, started, outcome.calls)
        steer.start()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        finally:
            steer.done.set()
            steer.join(10)
        outcome.seconds = round(time.monotonic() - started, 1)
    outcome.calls.append((outcome.seconds, f"virsh migrate ended: exit {proc.returncode}"))
    outcome.verdict = "moved" if proc.returncode == 0 else "stayed"
    outcome.detail = proc.stderr.strip()[-500:]
    if proc.returncode == 0:
        outcome.downtime_ms = downtime_of(dst, guest.name)
    return outcome
