"""Plain helpers for lab tests: the lab as `scripts/lab status --json` describes it, and test guests.

Everything goes through `scripts/lab` (a subprocess), the same interface humans and the demo use, so tests
exercise the real lab commands. Fixtures that hand these out are in conftest.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import labview, memcheck
from labkit.agents import trust_lab_ca
from labkit.guestdir import GuestRecord, console_path, read_console
from labkit.labview import CephCluster, ceph_from_status, hosts_from_status

REPO = Path(__file__).resolve().parents[2]
LAB_SCRIPT = REPO / "scripts" / "lab"
_VERIFIED = re.compile(r"verified (\d+) records on (\d+) disks")


class LabNotUp(Exception):
    """`scripts/lab status --json` says the lab is not (fully) up."""


def lab_cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `scripts/lab ARGS`; with check, a failure raises AssertionError carrying its stderr."""
    proc = subprocess.run(
        [str(LAB_SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"scripts/lab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


class LabHost(labview.LabHost):
    """A lab host as a test sees it: a failed virsh fails the test."""

    virsh_failure = AssertionError


@dataclass(frozen=True)
class Lab:
    token: str
    token_file: Path
    hosts: tuple[LabHost, ...]
    agents: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    def host(self, name: str) -> LabHost:
        return next(h for h in self.hosts if h.name == name)

    @property
    def ceph(self) -> CephCluster:
        return ceph_from_status(self.raw)

    def other(self, name: str) -> LabHost:
        return next(h for h in self.hosts if h.name != name)

    def agent(self, action: str, host: str) -> None:
        """start | stop | kill (SIGKILL) | restart the agent of one host."""
        lab_cli("agent", action, host)

    def link(self, state: str, host: str) -> None:
        """down | up: cut or restore the host's network link."""
        lab_cli("link", state, host)


def load_lab() -> Lab:
    proc = lab_cli("status", "--json", check=False, timeout=60)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise LabNotUp(f"the lab is not up (run scripts/lab up): {proc.stderr.strip()}")
    doc = json.loads(proc.stdout)
    hosts = hosts_from_status(doc, LabHost)
    trust_lab_ca(doc.get("caFile"))
    return Lab(doc["token"], Path(doc["tokenFile"]), hosts, bool(doc["agents"]), doc)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    disks: int
    output: str  # stdout + stderr of `guest verify`: on failure, names the first bad record


@dataclass
class Guest:
    """A lab test guest (`scripts/lab guest create`); acks are the writes it acknowledged, per disk."""

    name: str
    uuid: str
    host: str  # where it was created
    #: Where this case's part of the console starts (its length when the case made the guest, or at the
    #: case's last ``mark()``): a kernel death is looked for after it only.
    console_mark: int = 0

    def mark(self) -> int:
        """From here on is this case's console (e.g. just before a migration); returns the mark."""
        self.console_mark = len(self.console())
        return self.console_mark

    def died_after_a_switchover(self, death: str) -> bool:
        """The kernel's report (``death``) came while the guest ran on with the memory it had before a live
        switchover: it runs on another host than the one it was made on, and it did not boot again between
        this case's mark and the report (an offline move boots it; a death at boot is not this)."""
        part = self.console()[self.console_mark :]
        first = death.splitlines()[0]
        if BOOT_SIGN in part[: part.find(first)]:
            return False
        where = self.where()
        return bool(where) and self.host not in where

    def acks(self) -> dict[str, int]:
        return dict(json.loads(lab_cli("guest", "acks", self.name, "--json").stdout)["disks"])

    def total_acks(self) -> int:
        return sum(self.acks().values())

    def wait_for_acks(self, more: int = 20, timeout: float = 120) -> dict[str, int]:
        """Wait until every disk acknowledged at least `more` writes beyond what it had at the call, and the
        guest's memory checker printed a new `KSA-MEM ok` after the call with no inconsistent page anywhere
        on its console (``assert_memory_whole``): every test passes here after a migration."""
        mark = len(self.console())
        start = self.acks()
        deadline = time.monotonic() + timeout
        while True:
            now = self.acks()
            if now and all(now.get(dev, 0) >= start.get(dev, 0) + more for dev in now):
                self.assert_memory_whole(mark, max(deadline - time.monotonic(), 3 * memcheck.EVERY_S + 4))
                return now
            if time.monotonic() > deadline:
                message = f"{self.name}: acks not up by {more} in {timeout} s: {start} -> {now}"
                death = kernel_death_after(self, self.console_mark)
                if death is None:
                    raise AssertionError(message)
                message += f"; the guest's kernel died, its console:\n{death}"
                if self.died_after_a_switchover(death):
                    raise GuestDiedAfterSwitchover(f"{SWITCHOVER_DEATH}: {message}")
                raise AssertionError(message)
            time.sleep(0.5)

    def assert_memory_whole(self, mark: int, timeout: float = 3 * memcheck.EVERY_S + 4) -> None:
        """The memory checker (docs/lab.md) printed a new `ok` after ``mark`` (a length of ``console()``):
        it runs where the guest runs now; and no page was ever found stale or broken. Guests made with
        ``mem_check_mib=0`` have no checker."""
        if not memcheck.enabled(self.name):
            return
        try:
            report = memcheck.fresh(self.name, mark, timeout)
        except memcheck.MemCheckError as err:
            raise AssertionError(str(err)) from err
        print(report.describe())

    def verify(self, *, suspend: bool = True) -> VerifyResult:
        args = ["guest", "verify", self.name] + ([] if suspend else ["--no-suspend"])
        proc = lab_cli(*args, check=False)
        match = _VERIFIED.search(proc.stdout)
        return VerifyResult(
            ok=proc.returncode == 0,
            records=int(match.group(1)) if match else 0,
            disks=int(match.group(2)) if match else 0,
            output=proc.stdout + proc.stderr,
        )

    def where(self) -> dict[str, str]:
        """Lab hosts that have the domain, with its state there (e.g. {"hostB": "running"})."""
        rows = json.loads(lab_cli("guest", "list", "--json").stdout)
        return next((dict(r["hosts"]) for r in rows if r["name"] == self.name), {})

    def destroy(self) -> None:
        lab_cli("guest", "destroy", self.name)

    def console(self) -> str:
        """The guest's serial console so far (the lab keeps it with the guest's record)."""
        if not console_path(self.name).exists():
            return ""
        return read_console(self.name)  # refuses a rolled-over console (labkit/guestdir.py)


#: Where a failed case's guests leave their console and record: outside the lab, whose `down` removes
#: everything it made, so that a guest harmed in CI can still be read afterwards (docs/lab.md).
KEPT_DIR = Path("/var/tmp/ksa-failed-guests")
KEEP_AT_MOST = 16 << 20  # bytes of one file; a console or a record is far smaller


def keep_evidence(guest: Guest, case: str) -> Path | None:
    """Copy the guest's own directory (console, record, domain XML) to ``KEPT_DIR`` with where libvirt has it
    now; returns the copy, or None when there was nothing to copy. Never raises: the case failed already."""
    source = GuestRecord.dir_of(guest.name)
    if not source.is_dir():
        return None
    target = KEPT_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{guest.name}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            if path.is_file() and path.stat().st_size <= KEEP_AT_MOST:
                shutil.copy2(path, target / path.name)
        try:
            where: object = guest.where()
        except (AssertionError, ValueError, subprocess.SubprocessError, OSError) as err:
            where = f"unknown: {err}"
        (target / "case.json").write_text(json.dumps({"case": case, "where": where}, indent=2) + "\n")
    except OSError as err:
        print(f"{guest.name}: could not keep its console and record in {target}: {err}")
        return None
    return target


def create_guest(
    name: str,
    *,
    host: str = "hostA",
    data_volumes: int = 0,
    snapshots: int = 0,
    dirty_mib_s: int = 0,
    dirty_cpu_bound: bool = False,
    working_set_mib: int | None = None,
    storage: str = "ps1",
    disk_size_mib: int = 1024,
    memory_mib: int = 256,
    fill_mib: int = 4,
    disk_write_mib_s: int = 0,
    disk_write_dev: str = "vda",
    disk_write_seconds: int = 0,
    mem_check_mib: int | None = None,
    bare: bool = False,
) -> Guest:
    proc = lab_cli(
        "guest", "create", name,
        "--host", host,
        "--data-volumes", str(data_volumes),
        "--snapshots", str(snapshots),
        "--dirty-mib-s", str(dirty_mib_s),
        "--storage", storage,
        "--disk-size-mib", str(disk_size_mib),
        "--memory-mib", str(memory_mib),
        "--fill-mib", str(fill_mib),
        *(["--dirty-cpu-bound"] if dirty_cpu_bound else []),
        *(["--working-set-mib", str(working_set_mib)] if working_set_mib else []),
        *(["--mem-check-mib", str(mem_check_mib)] if mem_check_mib is not None else []),
        *(["--bare"] if bare else []),
        *(["--disk-write-mib-s", str(disk_write_mib_s), "--disk-write-dev", disk_write_dev,
           "--disk-write-seconds", str(disk_write_seconds)] if disk_write_mib_s else []),
    )  # fmt: skip
    guest = Guest(name=name, uuid=proc.stdout.strip().splitlines()[-1], host=host)
    guest.mark()
    return guest


def lab_status() -> dict[str, Any]:
    return dict(json.loads(lab_cli("status", "--json", check=False).stdout))


def restart_libvirtd(host: LabHost) -> None:
    """Stop the host's libvirtd (SIGTERM: QEMU keeps running) and start it again, nothing else
    (`scripts/lab libvirtd restart`: no `up`, which may rebuild a host it finds slow to answer)."""
    lab_cli("libvirtd", "restart", host.name)


#: The lab guest's dirtier mark: MiB written so far, the guest's uptime in 1/100 s (whole lines only: kernel
#: output can cut into a console line).
DIRTIED = re.compile(r"KSA-DIRTIED (\d+) (\d+)\s*$")


def dirty_speed_mib_s(guest: Guest, seconds: float = 4, within_s: float = 60) -> float:
    """How fast the guest dirties its memory now, in MiB/s, over at least ``seconds`` of the guest's own
    clock: its dirtier says every 8 MiB written (``KSA-DIRTIED <MiB> <uptime in 1/100 s>``, docs/lab.md).
    A TCG guest's dirtying speed is this machine's CPU speed: tests whose premise is "the guest dirties
    faster than the link" set the link from this figure instead of assuming one.

    Not QEMU's estimate (libvirt ``domdirtyrate-calc``): page sampling counts pages whose content changed
    within its window, so it cannot read above working set / window (16 MiB/s for 64 MiB over 4 s) however
    fast the guest goes; it read 0-18 MiB/s for a guest rewriting 24-44 MiB/s. A link set from it was a
    fraction of a CPU-bound guest's speed, and no throttle could bring the guest under it (a CI failure)."""
    mark = len(guest.console())
    deadline = time.monotonic() + within_s
    while True:
        lines = guest.console()[mark:].splitlines()[1:]  # the first may have been cut at the mark
        seen = [(int(m[1]), int(m[2])) for m in map(DIRTIED.match, lines) if m]
        if len(seen) >= 3 and seen[-1][1] - seen[0][1] >= seconds * 100:
            rate = (seen[-1][0] - seen[0][0]) / (seen[-1][1] - seen[0][1]) * 100
            print(f"{guest.name}: dirties {rate:.1f} MiB/s (its own marks over {seconds} s)")
            return rate
        assert time.monotonic() < deadline, f"{guest.name} said {len(seen)} dirtying marks in {within_s} s"
        time.sleep(0.5)


#: The words of a failure whose guest kernel died after a live switchover. QEMU 7.2 under TCG kills a guest
#: that way with plain `virsh migrate` too, no agent involved (docs/reliability.md, the control experiments
#: of `scripts/guest-safety`), so `./scripts/test` runs such a case once more and prints every such re-run
#: with the kernel's report at the end of the run (tests/lab/conftest.py); nothing else is ever re-run.
SWITCHOVER_DEATH = "the guest's kernel died after a live switchover"
#: What the guest prints when it boots (an offline move boots it on the destination).
BOOT_SIGN = "KSA-BOOT "


class GuestDiedAfterSwitchover(AssertionError):
    """A lab guest's kernel died right after a live migration's switchover (see ``SWITCHOVER_DEATH``)."""


#: What a guest kernel that died prints on its console.
PANIC_SIGNS = ("Kernel panic", "BUG: kernel", "Oops:")
#: Console lines given with a kernel's report of its death (the first line and what follows it).
DEATH_LINES = 12


def kernel_death_after(guest: Guest, mark: int) -> str | None:
    """The console lines from the first one after ``mark`` (a length of ``guest.console()``) that shows the
    guest kernel died, if any: its report, to put in a failure. A TCG guest has died right after a live
    migration's switchover (docs/reliability.md, "Agent kills and the `auto` strategy"); such a case fails,
    it is never run again."""
    lines = guest.console()[mark:].splitlines()
    first = next((i for i, ln in enumerate(lines) if any(s in ln for s in PANIC_SIGNS)), None)
    return None if first is None else "\n".join(lines[first : first + DEATH_LINES])
