"""Case 7: a hot disk (issue 16), a guest rewriting its disk at 2.5 x the task's cap or more.

The guest's real write rate is measured first (``domblkstat`` deltas) and sets the cap (rate / 2.5), as the
lab tests do. Side by side in each repetition, order alternating:
- same host: the agent (``auto``) against ``virsh blockcopy --bandwidth CAP --wait --pivot --timeout T``
  (a background mirror: expected never READY, stopped by virsh at T) and the same with
  ``--synchronous-writes`` (QEMU ``copy-mode: write-blocking``);
- across hosts: the agent (``auto``) against ``virsh migrate --live --copy-storage-inc --bandwidth CAP``
  (aborted with ``domjobabort`` at T if its mirror never gets READY: the memory phase never starts) and the
  same with ``--copy-storage-synchronous-writes``. ``--copy-storage-inc`` onto a fresh image: the disk has
  one layer, so this copies all its data, and QEMU charges only its allocated clusters to the cap, as the
  agent's own shallow copy does (``--copy-storage-all`` would also charge the holes, see LAB-NOTES).

Figures: time to finish / (allocated / cap), and the guest's write throughput during the move against the
3 s just before it (block statistics of the domain on whichever host runs it, every 0.25 s).
``python -m bench.cases.hotdisk results.json out.png`` draws the plot from a run's results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from bench.agentrun import require_clean, run_task
from bench.cases.bandwidth import JobWatcher, Sampler
from bench.cases.samehost import other_root
from bench.context import Context
from bench.labenv import (
    LAB_SCRIPT,
    BenchError,
    BenchGuest,
    Host,
    Lab,
    MiB,
    allocated_bytes,
    guest_name,
    lab_cli,
    measure_again_if_disturbed,
    run,
    virtual_size,
    wait_healthy,
)
from bench.table import Row
from bench.virshmigrate import destination_xml
from labkit.bodies import migration_body, to_host_body
from labkit.layout import LAB_DIR
from labkit.virsh import virsh_argv

log = logging.getLogger(__name__)

AGENT_SAME = "agent auto, same host"
COPY_BG = "virsh blockcopy --bandwidth"
COPY_SYNC = "virsh blockcopy --synchronous-writes --bandwidth"
AGENT_CROSS = "agent auto, to the other host"
MIGRATE_BG = "virsh migrate --copy-storage-inc --bandwidth"
MIGRATE_SYNC = "virsh migrate --copy-storage-inc --copy-storage-synchronous-writes --bandwidth"
SUBJECTS = (AGENT_SAME, COPY_BG, COPY_SYNC, AGENT_CROSS, MIGRATE_BG, MIGRATE_SYNC)
SAME_HOST = (AGENT_SAME, COPY_BG, COPY_SYNC)

HOT_DEV = "vda"
OVER_CAP = 2.5  # the guest writes at least this times the cap
BEFORE_S = 3.0  # the guest's writes are also read for this long just before each move


@dataclass(frozen=True)
class HotSettings:
    reps: int
    ask_mib_s: int  # asked of the guest's writer; what it really writes sets the cap
    disk_size_mib: int
    fill_mib: int  # filler besides the 64 MiB rewritten region and the records
    timeout_factor: float  # the baselines are stopped at this times virtual size / cap ...
    timeout_min_s: float  # ... but never before this


# 256 MiB virtual: records in the first half, 64 MiB of filler, the rewritten 64 MiB at the end (about half
# allocated: `virsh blockcopy` charges the holes to its cap too, so they are kept small).
QUICK = HotSettings(reps=1, ask_mib_s=20, disk_size_mib=256, fill_mib=64, timeout_factor=3, timeout_min_s=60)
FULL = HotSettings(reps=3, ask_mib_s=20, disk_size_mib=256, fill_mib=64, timeout_factor=3, timeout_min_s=60)


# -- pure arithmetic (unit tested) --------------------------------------------------------------------------


def cap_for(rate_mib_s: float) -> int:
    """The cap (MiB/s, whole) under which a guest measured writing ``rate_mib_s`` writes >= 2.5 x it."""
    cap = int(rate_mib_s / OVER_CAP)
    if cap < 1:
        raise BenchError(f"premise: the guest writes only {rate_mib_s:.1f} MiB/s, no cap is 2.5 x under it")
    return cap


def stop_after_s(virtual: int, cap_mib: int, factor: float, minimum: float) -> float:
    """When a baseline that has not finished is stopped: ``factor`` x the time a quiet disk of this virtual
    size takes at the cap when the holes are charged too (libvirt's blockcopy), at least ``minimum``."""
    return max(minimum, factor * virtual / (cap_mib * MiB))


def written_bytes(samples: Sequence[tuple[float, str, int]], start: float, end: float) -> tuple[float, float]:
    """(bytes the guest wrote, seconds) between ``start`` and ``end`` from block-statistics samples
    (time, host, cumulative ``wr_bytes``). The guest runs on the host of the first sample in the window;
    on another host (it arrived there by migration) the counters belong to a new QEMU and start at zero."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return math.nan, 0.0
    first_host = inside[0][1]
    total = 0.0
    for host in dict.fromkeys(h for _t, h, _v in inside):
        values = [v for _t, h, v in inside if h == host]
        total += values[-1] - (values[0] if host == first_host else 0)
    return total, inside[-1][0] - inside[0][0]


def rate_mib_s(samples: Sequence[tuple[float, str, int]], start: float, end: float) -> float:
    written, seconds = written_bytes(samples, start, end)
    return written / seconds / MiB if seconds > 0 else math.nan


# -- measuring ----------------------------------------------------------------------------------------------


class GuestWrites(Sampler):
    """A thread reading the guest's ``wr_bytes`` on the hot disk, on every lab host, every ``every_s``."""

    def __init__(self, hosts: Sequence[Host], name: str, every_s: float = 0.25) -> None:
        super().__init__()
        self.uris = {h.name: h.libvirt_uri for h in hosts}
        self.name, self.every_s = name, every_s
        self.samples: list[tuple[float, str, int]] = []

    def _loop(self) -> None:
        conns = {name: libvirt.open(uri) for name, uri in self.uris.items()}
        try:
            while not self._stop.is_set():
                for host, conn in conns.items():
                    with contextlib.suppress(libvirt.libvirtError):  # not (or no longer) on this host
                        dom = conn.lookupByName(self.name)
                        if dom.isActive():
                            written = int(dom.blockStats(HOT_DEV)[3])
                            self.samples.append((time.monotonic(), host, written))
                self._stop.wait(self.every_s)
        finally:
            for conn in conns.values():
                conn.close()


@dataclass
class Step:
    """One subject's move in one repetition."""

    subject: str
    seconds: float  # request (or command) to the end: finished, or stopped at the timeout
    finished: bool  # moved and switched to the copy
    allocated: int
    cap_mib: int
    stop_after_s: float
    virtual: int = 0
    writes_before: float = math.nan  # MiB/s, the BEFORE_S seconds before
    writes_during: float = math.nan  # MiB/s, during the move
    detail: str = ""

    @property
    def time_over_ideal(self) -> float:
        return self.seconds / (self.allocated / (self.cap_mib * MiB))


async def _measured(ctx: Context, guest: BenchGuest, move: Callable[[], Awaitable[Step]]) -> Step:
    """``move()`` with the guest's writes read during it and for BEFORE_S seconds just before it."""
    with GuestWrites(ctx.lab.hosts, guest.name) as meter:
        await asyncio.sleep(BEFORE_S)
        started = time.monotonic()
        step = await move()
        ended = time.monotonic()
    step.writes_before = rate_mib_s(meter.samples, started - BEFORE_S, started)
    step.writes_during = rate_mib_s(meter.samples, started, ended)
    return step


async def _agent(ctx: Context, guest: BenchGuest, cap: int, cross: bool) -> Step:
    allocated = allocated_bytes(guest.sources()[HOT_DEV])
    virtual = virtual_size(guest.sources()[HOT_DEV])
    src = guest.host
    if cross:
        dst = ctx.lab.other(src)
        body = to_host_body(dst, bandwidth=cap, strategy="auto", downTime=1000, timeout=600)
    else:
        body = migration_body(
            other_root(guest, guest.sources()[HOT_DEV]).uuid, bandwidth=cap, strategy="auto"
        )
    result = await run_task(ctx.lab, src, guest.uuid, body, receiver=ctx.receiver, poll_s=0.5)
    if cross:
        guest.locate(ctx.lab)
    guest.drop_unused_files()
    require_clean(result, f"the agent's {'cross-host' if cross else 'same-host'} move of a hot disk")
    assert result.elapsed is not None
    details = result.view.get("details", {})
    mode = details.get("disks", {}).get(HOT_DEV, {}).get("mode", "?")
    over = details.get("overBudget")
    said = (
        f"overBudget said: real bytes {over['realBytesPerSecond'] / MiB:.1f} MiB/s"
        if over
        else "no overBudget"
    )
    downtime = f", downtime {result.view.get('downtimeMs')} ms" if cross else ""
    return Step(
        AGENT_CROSS if cross else AGENT_SAME,
        result.elapsed,
        True,
        allocated,
        cap,
        math.nan,
        virtual,
        detail=f"{HOT_DEV} {mode}; {said}{downtime}",
    )


def _blockcopy(guest: BenchGuest, cap: int, hs: HotSettings, synchronous: bool) -> Step:
    """``virsh blockcopy --bandwidth CAP [--synchronous-writes] --wait --pivot --timeout T``."""
    source = guest.sources()[HOT_DEV]
    allocated = allocated_bytes(source)
    virtual = virtual_size(source)
    limit = stop_after_s(virtual, cap, hs.timeout_factor, hs.timeout_min_s)
    dst = str(other_root(guest, source).path / f"{guest.name}-{HOT_DEV}-{uuid.uuid4().hex[:6]}.qcow2")
    guest.files.add(dst)
    argv = [*virsh_argv(guest.host.libvirt_uri), "blockcopy", guest.name, HOT_DEV, dst]
    argv += ["--bandwidth", str(cap), "--wait", "--pivot", "--transient-job", "--timeout", str(round(limit))]
    argv += ["--synchronous-writes"] if synchronous else []
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit + 300, check=False)
    took = time.monotonic() - started
    pivoted = guest.sources()[HOT_DEV] == dst
    guest.drop_unused_files()
    said = (proc.stderr or proc.stdout).strip().splitlines()
    if proc.returncode != 0 and took < limit - 1:
        raise BenchError(f"virsh blockcopy failed after {took:.1f} s: {' '.join(said)}")
    detail = "pivoted" if pivoted else f"not READY at the timeout, aborted by virsh ({' '.join(said[-1:])})"
    subject = COPY_SYNC if synchronous else COPY_BG
    return Step(subject, took, pivoted, allocated, cap, limit, virtual, detail=detail)


def _migrate(lab: Lab, guest: BenchGuest, cap: int, hs: HotSettings, synchronous: bool) -> Step:
    """``virsh migrate --live --copy-storage-inc [--copy-storage-synchronous-writes] --bandwidth CAP``,
    ``domjobabort`` at the timeout (libvirt starts the memory phase only once every disk mirror is READY)."""
    src, dst = guest.host, lab.other(guest.host)
    source = guest.sources()[HOT_DEV]
    allocated = allocated_bytes(source)
    virtual = virtual_size(source)
    limit = stop_after_s(virtual, cap, hs.timeout_factor, hs.timeout_min_s)
    new_paths = {
        dev: str(dst.root("ps1").path / f"{guest.name}-{dev}-{uuid.uuid4().hex[:6]}.qcow2")
        for dev in guest.sources()
    }
    for dev, path in new_paths.items():  # libvirt needs the targets of plain files to exist
        guest.files.add(path)
        run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(virtual_size(guest.sources()[dev]))])
    options = ["--copy-storage-inc", "--bandwidth", str(cap)]
    options += ["--copy-storage-synchronous-writes"] if synchronous else []
    watcher = JobWatcher(src.libvirt_uri, guest.name)
    aborted = False
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="bench-") as xml:
        xml.write(destination_xml(src, guest.name, new_paths))
        xml.flush()
        argv = [*virsh_argv(src.libvirt_uri), "migrate", "--live", *options]
        argv += ["--persistent", "--undefinesource", "--xml", xml.name, "--persistent-xml", xml.name]
        argv += ["--migrateuri", f"tcp://{dst.migration_address}", guest.name, dst.libvirt_uri]
        started = time.monotonic()
        with watcher:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                out, err = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                aborted = True
                src.virsh("domjobabort", guest.name, check=False)
                out, err = proc.communicate(timeout=300)
        took = time.monotonic() - started
    memory_at = watcher.first(
        lambda s: int(s.get("memory_processed", 0)) > 0 or int(s.get("memory_iteration", 0)) > 0
    )
    last = watcher.samples[-1][1] if watcher.samples else {}
    done, total = (int(last.get(k, 0)) / MiB for k in ("disk_processed", "disk_total"))
    disk = f"disk {done:.0f} of {total:.0f} MiB" if total else "libvirt's job statistics gave no disk figures"
    finished = proc.returncode == 0
    crashed = ""
    if aborted and src.virsh("domstate", guest.name, check=False).strip() == "shut off":
        # Seen here (libvirt 9.0, QEMU 7.2): domjobabort of a migration with synchronous writes can take
        # the source QEMU down ("reason=crashed"); the disks are intact, so the guest is started again.
        crashed = "; the abort crashed the source QEMU (guest started again)"
        src.virsh("start", guest.name)
        time.sleep(15)  # booted and writing again
    guest.locate(lab)
    guest.drop_unused_files()
    if not finished and not aborted:
        raise BenchError(f"virsh migrate {' '.join(options)} failed: {(err or out).strip()}")
    if finished:
        detail = f"memory phase from {memory_at - started:.1f} s" if memory_at else "completed"
    elif memory_at is None:
        detail = f"disk mirror never READY (memory phase never started), aborted at the timeout ({disk})"
    else:
        detail = f"aborted at the timeout in the memory phase (from {memory_at - started:.1f} s)"
    detail += crashed
    if aborted:
        took = min(took, limit)  # the abort's own wind-down is not the baseline's time
    return Step(
        MIGRATE_SYNC if synchronous else MIGRATE_BG,
        took,
        finished,
        allocated,
        cap,
        limit,
        virtual,
        detail=detail,
    )


# -- the guest ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hot_guest(lab: Lab, hs: HotSettings) -> Iterator[BenchGuest]:
    """A lab guest rewriting the last 64 MiB of vda at ``ask_mib_s``, destroyed with every file at the end."""
    name = guest_name("hot")
    args = ["guest", "create", name, "--host", "hostA", "--disk-write-mib-s", str(hs.ask_mib_s),
            "--disk-size-mib", str(hs.disk_size_mib), "--fill-mib", str(hs.fill_mib)]  # fmt: skip
    guest: BenchGuest | None = None
    try:
        wait_healthy()
        vm_uuid = lab_cli(*args, timeout=900).strip().splitlines()[-1]
        guest = BenchGuest(name, vm_uuid, lab.host("hostA"))
        guest.sources()
        yield guest
    finally:
        if guest is not None:
            with contextlib.suppress(BenchError):
                guest.sources()
        run([str(LAB_SCRIPT), "guest", "destroy", name], check=False, timeout=300)
        for path in sorted(guest.files) if guest else []:
            if Path(path).resolve().is_relative_to(LAB_DIR) and os.path.isfile(path):
                os.unlink(path)


def _write_rate_now(lab: Lab, guest: BenchGuest, seconds: float = 4.0) -> float:
    with GuestWrites(lab.hosts, guest.name) as meter:
        time.sleep(seconds)
    return rate_mib_s(meter.samples, 0.0, math.inf)


# -- the case -----------------------------------------------------------------------------------------------


async def run_case(ctx: Context) -> list[Row]:
    hs = QUICK if ctx.settings.mode == "quick" else FULL
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # lookups on the other host fail: quiet
    steps: dict[str, list[Step]] = {s: [] for s in SUBJECTS}
    with hot_guest(ctx.lab, hs) as guest:
        await asyncio.sleep(5)  # past the boot's first writes
        premise = await asyncio.to_thread(_write_rate_now, ctx.lab, guest)
        cap = cap_for(premise)
        log.info("case 7: the guest writes %.1f MiB/s (asked %d): cap %d MiB/s", premise, hs.ask_mib_s, cap)

        def recover() -> None:
            guest.locate(ctx.lab)
            guest.drop_unused_files()

        moves: dict[str, Callable[[], Awaitable[Step]]] = {
            AGENT_SAME: lambda: _agent(ctx, guest, cap, cross=False),
            COPY_BG: lambda: asyncio.to_thread(_blockcopy, guest, cap, hs, False),
            COPY_SYNC: lambda: asyncio.to_thread(_blockcopy, guest, cap, hs, True),
            AGENT_CROSS: lambda: _agent(ctx, guest, cap, cross=True),
            MIGRATE_BG: lambda: asyncio.to_thread(_migrate, ctx.lab, guest, cap, hs, False),
            MIGRATE_SYNC: lambda: asyncio.to_thread(_migrate, ctx.lab, guest, cap, hs, True),
        }
        for rep in range(hs.reps):
            order = SUBJECTS if rep % 2 == 0 else tuple(reversed(SUBJECTS))
            for subject in order:
                os.sync()
                step = await measure_again_if_disturbed(
                    subject, _bind(_measured, ctx, guest, moves[subject]), recover
                )
                steps[subject].append(step)
                log.info(
                    "case 7 rep %d %s: %.1f s (%.2f x allocated / cap), finished %s, guest writes %.1f -> "
                    "%.1f MiB/s; %s", rep + 1, subject, step.seconds, step.time_over_ideal, step.finished,
                    step.writes_before, step.writes_during, step.detail,
                )  # fmt: skip
    ctx.raw["7"] = {
        "premiseMiBs": premise,
        "askedMiBs": hs.ask_mib_s,
        "capMiBs": cap,
        "settings": hs.__dict__,
        "steps": {
            s: [{**st.__dict__, "timeOverIdeal": st.time_over_ideal} for st in v] for s, v in steps.items()
        },
        "loadavg": list(os.getloadavg()),
    }
    return rows_of(steps, premise, cap, hs)


def _bind(
    fn: Callable[[Context, BenchGuest, Callable[[], Awaitable[Step]]], Awaitable[Step]],
    ctx: Context,
    guest: BenchGuest,
    move: Callable[[], Awaitable[Step]],
) -> Callable[[], Awaitable[Step]]:
    return lambda: fn(ctx, guest, move)


def rows_of(steps: dict[str, list[Step]], premise: float, cap: int, hs: HotSettings) -> list[Row]:
    title = (
        f"hot disk: guest writing {premise:.1f} MiB/s (asked {hs.ask_mib_s}), cap {cap} MiB/s "
        f"({premise / cap:.1f} x under it)"
    )
    rows = []
    for subject in SUBJECTS:
        done = [s for s in steps[subject] if s.finished]
        stopped = [s for s in steps[subject] if not s.finished]
        allocated = ", ".join(f"{s.allocated / MiB:.0f}" for s in steps[subject])
        virtual = steps[subject][0].virtual / MiB if steps[subject] else 0
        details = "; ".join(dict.fromkeys(s.detail for s in steps[subject]))
        note = f"{allocated} MiB allocated of {virtual:.0f} MiB virtual; {details}"
        if stopped:
            limits = ", ".join(f"{s.stop_after_s:.0f}" for s in stopped)
            note = (
                f"stopped unfinished {len(stopped)} of {len(steps[subject])} times at the timeout "
                f"({limits} s = {stopped[0].time_over_ideal:.1f} x allocated / cap); {note}"
            )
        if done:
            rows.append(
                Row("7", title, subject, "time to finish / (allocated / cap)", "x",
                    [s.time_over_ideal for s in done], note=note)
            )  # fmt: skip
        else:
            rows.append(
                Row("7", title, subject, "time to finish / (allocated / cap)", "x",
                    not_measured=f"never finished (n = {len(stopped)})", note=note)
            )  # fmt: skip
        rows.append(
            Row("7", title, subject, "guest writes during the move", "MiB/s",
                [s.writes_during for s in steps[subject]], baseline="the 3 s just before",
                baseline_values=[s.writes_before for s in steps[subject]])
        )  # fmt: skip
    return rows


# -- the plot -----------------------------------------------------------------------------------------------


def plot_hot_disk(raw: dict[str, Any], path: Path) -> None:
    """Two panels per subject: time to finish / (allocated / cap) (hatched: stopped at the timeout, never
    finished) and the guest's write throughput during the move against just before it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = [s for s in SUBJECTS if raw["steps"].get(s)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for i, subject in enumerate(subjects):
        runs = raw["steps"][subject]
        color = "tab:blue" if subject.startswith("agent") else "tab:gray"
        ratios = sorted(r["timeOverIdeal"] for r in runs)
        unfinished = not any(r["finished"] for r in runs)
        mid = ratios[len(ratios) // 2]
        top.bar(i, mid, color=color, hatch="//" if unfinished else None, alpha=0.5 if unfinished else 1.0,
                edgecolor="black")  # fmt: skip
        top.plot([i] * len(ratios), ratios, "k.", markersize=6)
        label = "stopped at timeout\n(never finished)" if unfinished else f"{mid:.2f} x"
        top.annotate(label, (i, mid), ha="center", va="bottom", fontsize=8)
        during = [r["writes_during"] for r in runs]
        before = [r["writes_before"] for r in runs]
        bottom.bar(i - 0.2, sorted(before)[len(before) // 2], width=0.4, color="lightgray", edgecolor="black",
                   label="just before" if i == 0 else None)  # fmt: skip
        bottom.bar(i + 0.2, sorted(during)[len(during) // 2], width=0.4, color=color, edgecolor="black",
                   label="during the move" if i == 0 else None)  # fmt: skip
        bottom.plot(
            [i - 0.2] * len(before), before, "k.", [i + 0.2] * len(during), during, "k.", markersize=5
        )
    top.axhline(1.0, color="green", linestyle="--", linewidth=1)
    top.set_ylabel("time to finish / (allocated / cap)")
    top.grid(True, axis="y", alpha=0.3)
    bottom.axhline(
        raw["capMiBs"], color="tab:red", linestyle="--", linewidth=1, label=f"cap {raw['capMiBs']} MiB/s"
    )
    bottom.set_ylabel("guest writes (MiB/s)")
    bottom.legend(fontsize=8, loc="upper right")
    bottom.grid(True, axis="y", alpha=0.3)
    bottom.set_xticks(range(len(subjects)))
    bottom.set_xticklabels([s.replace(" --", "\n--").replace(", ", ",\n") for s in subjects], fontsize=7)
    load = ", ".join(f"{x:.1f}" for x in raw.get("loadavg", []))
    fig.suptitle(
        f"Hot disk: guest writing {raw['premiseMiBs']:.1f} MiB/s, cap {raw['capMiBs']} MiB/s "
        f"(bars: medians, dots: each run; load average at the end {load})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.cases.hotdisk RESULTS.json OUT.png", file=sys.stderr)
        return 2
    doc = json.loads(Path(argv[0]).read_text())
    plot_hot_disk(doc["raw"]["7"], Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
