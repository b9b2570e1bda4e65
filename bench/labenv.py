"""The lab as the benchmark sees it: hosts from `scripts/lab status --json`, virsh on a host, commands in a
host's network namespace, the agents' processes, and bench guests that are always destroyed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil  # type: ignore[import-untyped]

from labkit import memcheck
from labkit.agents import trust_lab_ca
from labkit.domain import disks_in_xml
from labkit.labview import LabHost, hosts_from_status
from labkit.layout import LAB_DIR, SUFFIX

REPO = Path(__file__).resolve().parent.parent
LAB_SCRIPT = REPO / "scripts" / "lab"
HOSTS = ("hostA", "hostB")
DAEMONS = ("agent", "libvirtd")
MiB = 1 << 20
GiB = 1 << 30

log = logging.getLogger(__name__)
T = TypeVar("T")


class BenchError(Exception):
    """Something the benchmark needs is not there or did not work (the lab, a command, a guest)."""


class GuestHarmed(BenchError):
    """The guest's memory checker found an inconsistent page or stopped: a finding, never measured again."""


class Disturbed(BenchError):
    """A measurement was disturbed from outside (an agent or libvirtd restarted by a teammate's fault
    test): it says nothing about performance and is taken again."""


def run(argv: list[str], *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def lab_cli(*args: str, timeout: float = 600) -> str:
    return run([str(LAB_SCRIPT), *args], timeout=timeout).stdout


class Host(LabHost):
    """A lab host as the benchmark sees it: a failed virsh is a ``BenchError`` (a disturbed measurement is
    taken again), and a command may take long (a 2 GiB block copy with ``--wait``)."""

    virsh_failure = BenchError
    virsh_timeout = 600

    def netns(self, argv: list[str]) -> list[str]:
        """argv run inside this host's network namespace (its address, its link)."""
        return ["ip", "netns", "exec", f"{self.name}{SUFFIX}", *argv]

    def agent_pid(self) -> int:
        """The agent's pid now (it changes when a teammate restarts the agent)."""
        return int(_status()["hostsByName"][self.name]["pids"]["agent"])


@dataclass(frozen=True)
class Lab:
    token: str
    hosts: tuple[Host, ...]

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def other(self, host: Host) -> Host:
        return next(h for h in self.hosts if h.name != host.name)


def _status() -> dict[str, Any]:
    proc = run([str(LAB_SCRIPT), "status", "--json"], check=False, timeout=60)
    if not proc.stdout.strip():  # no lab at all (a teammate's scripts/test ends with `lab down`)
        return {"ok": False, "down": True, "hosts": [], "hostsByName": {}, "why": proc.stderr.strip()}
    doc: dict[str, Any] = json.loads(proc.stdout)
    doc["ok"] = proc.returncode == 0
    doc["hostsByName"] = {h["name"]: h for h in doc["hosts"]}
    return doc


def daemon_pids() -> dict[str, int]:
    """ "hostA agent" -> pid, "hostA libvirtd" -> pid, ...: a change between two readings means a daemon
    was restarted in between (teammates' fault tests do that), which voids a measurement."""
    out = {}
    for h in _status()["hosts"]:
        for daemon in ("agent", "libvirtd"):
            pid = h.get("pids", {}).get(daemon)
            healthy = h.get("health", {}).get(daemon, False)
            out[f"{h['name']} {daemon}"] = int(pid) if pid and healthy else 0  # 0: down right now
    return out


def restarted(before: dict[str, int], after: dict[str, int], watch: tuple[str, ...] = DAEMONS) -> list[str]:
    """The watched daemons ("agent", "libvirtd") that restarted, or were down, at either reading."""
    return sorted(
        name
        for name, pid in before.items()
        if name.split()[-1] in watch and (after.get(name) != pid or pid == 0)
    )


def _healthy(doc: dict[str, Any]) -> bool:
    return bool(doc["ok"] and doc.get("agents") and all(all(h["health"].values()) for h in doc["hosts"]))


def wait_healthy(within_s: float = 300) -> dict[str, Any]:
    """Wait until both hosts and both agents are up. Teammates' fault tests stop agents and libvirtd on
    purpose for a while; the bench waits for them rather than repairing the lab under their feet."""
    deadline = time.monotonic() + within_s
    down_since: float | None = None
    while True:
        doc = _status()
        if _healthy(doc):
            return doc
        if doc.get("down"):
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > 10:  # down, not being brought up by someone: bring it up
                log.warning("the lab is down (%s): scripts/lab up", doc.get("why"))
                run([str(LAB_SCRIPT), "up"], timeout=600, check=False)
                down_since = None
        else:
            down_since = None
        if time.monotonic() > deadline:
            down = [f"{h['name']}: {k}" for h in doc["hosts"] for k, v in h["health"].items() if not v]
            raise BenchError(f"the lab is not healthy after {within_s:.0f} s: {', '.join(down) or 'down'}")
        time.sleep(2)


def ensure_lab() -> Lab:
    """The running lab; brought up if it is down (never restarted, never taken down: teammates share it)."""
    here = os.stat("/proc/self/ns/net").st_ino
    netns = [f"/run/netns/{h}{SUFFIX}" for h in HOSTS]
    if any(os.path.exists(n) and os.stat(n).st_ino == here for n in netns):
        # Run inside a lab host's namespace, `scripts/lab up` would rebuild that host's network in the
        # wrong place (and cut the host off): refuse to touch the lab from there.
        raise BenchError("run the bench from the root network namespace, not inside a lab host")
    if not _status()["ok"]:
        log.info("the lab is not up: scripts/lab up")
        run([str(LAB_SCRIPT), "up"], timeout=600)
    doc = wait_healthy()
    hosts = hosts_from_status(doc, Host)
    trust_lab_ca(doc.get("caFile"))
    return Lab(doc["token"], hosts)


# -- images -------------------------------------------------------------------------------------------------


def allocated_bytes(path: str) -> int:
    """Bytes of the image's own data (qemu-img map, this layer only): what a move must really copy."""
    out = run(["qemu-img", "map", "-U", "--output=json", path]).stdout
    return sum(int(e["length"]) for e in json.loads(out) if e.get("data") and int(e.get("depth", 0)) == 0)


def virtual_size(path: str) -> int:
    out = run(["qemu-img", "info", "-U", "--output=json", path]).stdout
    return int(json.loads(out)["virtual-size"])


def disk_sources(host: Host, domain: str) -> dict[str, str]:
    """target dev -> source file of the running domain (live XML)."""
    return {disk.dev: disk.path for disk in disks_in_xml(host.virsh("dumpxml", domain))}


# -- processes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds of a process (user + system) and of its reaped children, at one moment."""

    pid: int
    own: float
    children: float
    at: float

    @classmethod
    def of(cls, pid: int) -> CpuReading:
        times = psutil.Process(pid).cpu_times()
        return cls(
            pid, times.user + times.system, times.children_user + times.children_system, time.monotonic()
        )

    def since(self, earlier: CpuReading) -> tuple[float, float] | None:
        """(own, children) CPU seconds between two readings; None if the process changed (restarted)."""
        if earlier.pid != self.pid:
            return None
        return self.own - earlier.own, self.children - earlier.children


def cpu_of(host: Host) -> CpuReading | None:
    try:
        return CpuReading.of(host.agent_pid())
    except (psutil.Error, KeyError, TypeError, ValueError, BenchError):  # agent down right now
        return None


# -- guests -------------------------------------------------------------------------------------------------


@dataclass
class BenchGuest:
    """A lab guest made for one case. ``host`` is where it runs now; every image file it ever used is kept
    in ``files`` so that moves can remove their sources (the agent leaves them for the management plane)."""

    name: str
    uuid: str
    host: Host
    files: set[str] = field(default_factory=set)
    keep: bool = False  # left running with its files when the case ends (evidence of harm, looked at live)

    def sources(self) -> dict[str, str]:
        found = disk_sources(self.host, self.name)
        self.files.update(found.values())
        return found

    def moved_to(self, host: Host) -> None:
        """After a move (or a failed one) the guest runs on ``host``; its memory checker must print a new
        `ok` there with no inconsistent page anywhere on its console (a BenchError otherwise: never
        measured again)."""
        self.host = host
        self.sources()
        check_memory(self.name)

    def locate(self, lab: Lab, within_s: float = 60) -> Host:
        """Find the host where the domain runs now (after a cross-host move, or one that failed). A failed
        migration may still be winding down for a few seconds after the task ended (domain paused)."""
        deadline = time.monotonic() + within_s
        while True:
            seen = {}
            for host in lab.hosts:
                seen[host.name] = host.virsh("domstate", self.name, check=False).strip() or "-"
                if seen[host.name] == "running":
                    self.moved_to(host)
                    return host
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} runs on no lab host after {within_s:.0f} s: {seen}")
            log.warning("%s not running anywhere yet: %s", self.name, seen)
            time.sleep(1)

    def drop_unused_files(self) -> None:
        """Delete the images this guest no longer uses (only under the lab's storage)."""
        in_use = set(self.sources().values())
        for path in sorted(self.files - in_use):
            if Path(path).resolve().is_relative_to(LAB_DIR) and os.path.isfile(path):
                os.unlink(path)
            self.files.discard(path)


def check_memory(name: str) -> None:
    if not memcheck.enabled(name):
        return
    try:
        report = memcheck.fresh(name, memcheck.mark(name))
    except memcheck.MemCheckError as err:
        raise GuestHarmed(str(err)) from err
    log.info("%s", report.describe())


def _destroy(name: str) -> None:
    """`scripts/lab guest destroy`, again until no lab host has the domain (a destroy during a migration's
    abort can leave it running)."""
    for attempt in range(1, 6):
        proc = run([str(LAB_SCRIPT), "guest", "destroy", name], check=False, timeout=300)
        if proc.returncode != 0:
            log.warning("destroying %s: %s", name, proc.stderr.strip())
        rows = json.loads(run([str(LAB_SCRIPT), "guest", "list", "--json"], check=False).stdout or "[]")
        if not any(r["name"] == name and r["hosts"] for r in rows):
            return
        log.warning("%s is still defined after destroy (attempt %d); again in a moment", name, attempt)
        time.sleep(3 * attempt)
    log.error("could not destroy %s: remove it with scripts/lab guest destroy %s", name, name)


async def measure_again_if_disturbed(
    what: str,
    measure: Callable[[], Awaitable[T]],
    recover: Callable[[], None],
    *,
    attempts: int = 5,
    watch: tuple[str, ...] = DAEMONS,
) -> T:
    """``measure()``; when it was disturbed from outside (libvirtd or an agent restarted meanwhile, or a
    command failed while a teammate's fault test had one down), wait for a healthy lab, ``recover()`` and
    measure again."""
    for attempt in range(1, attempts + 1):
        try:
            before = await asyncio.to_thread(daemon_pids)
            result = await measure()
            if gone := restarted(before, await asyncio.to_thread(daemon_pids), watch):
                raise Disturbed(f"restarted during the measurement: {', '.join(gone)}")
            return result
        except GuestHarmed:
            raise  # a finding about the guest, not a disturbance: never hidden by measuring again
        except BenchError as err:
            if attempt == attempts:
                raise
            log.warning("%s: %s; measuring again once the lab is healthy", what, err)
            await asyncio.to_thread(wait_healthy)
            await asyncio.to_thread(recover)
    raise AssertionError("unreachable")


_NAME = re.compile(r"[^a-z0-9-]+")


def guest_name(case: str) -> str:
    return f"bench-{_NAME.sub('-', case.lower())}-{uuid.uuid4().hex[:6]}"


@contextmanager
def bench_guest(
    lab: Lab,
    case: str,
    *,
    host: str = "hostA",
    data_volumes: int = 0,
    dirty_mib_s: int = 0,
    disk_size_mib: int = 1024,
    fill_mib: int = 4,
    memory_mib: int = 256,
    disk_write_mib_s: int = 0,
) -> Iterator[BenchGuest]:
    """A writing lab guest (`scripts/lab guest create`), destroyed (with every file) when the case ends,
    unless the case set ``keep`` (a harmed guest kept as evidence)."""
    name = guest_name(case)
    args = [
        "guest", "create", name,
        "--host", host,
        "--data-volumes", str(data_volumes),
        "--dirty-mib-s", str(dirty_mib_s),
        "--disk-size-mib", str(disk_size_mib),
        "--fill-mib", str(fill_mib),
        "--memory-mib", str(memory_mib),
        "--disk-write-mib-s", str(disk_write_mib_s),
    ]  # fmt: skip
    log.info("creating guest %s (%s)", name, " ".join(args[3:]))
    started = time.monotonic()
    guest: BenchGuest | None = None
    try:
        for attempt in range(1, 5):
            wait_healthy()
            try:
                vm_uuid = lab_cli(*args, timeout=900).strip().splitlines()[-1]
                break
            except BenchError as err:  # e.g. a teammate's fault test restarted libvirtd just then
                if attempt == 4:
                    raise
                log.warning("creating %s failed (%s), trying again", name, str(err).splitlines()[-1])
                time.sleep(5 * attempt)
                wait_healthy()
                # a failed create may leave a domain behind when libvirtd went away in the middle
                run([str(LAB_SCRIPT), "guest", "destroy", name], check=False, timeout=300)
        guest = BenchGuest(name, vm_uuid, lab.host(host))
        guest.sources()
        log.info("guest %s up in %.0f s", name, time.monotonic() - started)
        yield guest
    finally:
        if guest is not None:
            with contextlib.suppress(BenchError, ET.ParseError):
                guest.sources()
        if guest is not None and guest.keep:
            log.warning("guest %s kept as evidence: remove it with scripts/lab guest destroy %s", name, name)
        else:
            _destroy(name)
            for path in sorted(guest.files) if guest else []:  # copies made under other names
                if Path(path).resolve().is_relative_to(LAB_DIR) and os.path.isfile(path):
                    os.unlink(path)
