"""scripts/guest-safety [--runs N] [--out DIR] [--cells a,b,...]: N cross-host migrations per cell of one
128 MiB guest that dirties 8 MiB/s and checks its memory, back and forth (hostA -> hostB -> hostA ...: each
migration is one run, with its own console mark). Rows are appended to DIR/runs.jsonl, so a long series
runs in chunks; DIR/table.md is rewritten from all rows after every run. A run that harms the guest (a stale
page, a kernel death, the checker or the writers stopped) stops its cell: its console and calls are kept in
DIR/evidence/."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.labenv import BenchGuest, Host, Lab, bench_guest, ensure_lab, wait_healthy
from bench.safety import agentcell, report, virshcell
from bench.safety.diagnose import diagnose
from bench.safety.observe import Outcome, look_after, running_on
from labkit import memcheck
from labkit.guestdir import console_path
from labkit.layout import host_by_name

log = logging.getLogger("guest-safety")
CELLS = (*virshcell.CELLS, *agentcell.CELLS)


#: The cells whose guest also writes its root disk (asked 20 MiB/s, as test_hotdisk's hot guest) beside a
#: data volume; every cell's guest has 128 MiB and dirties 8 MiB/s.
HOT_CELLS = ("auto-hotdisk", "sync-writes")
HOT_WRITE_MIB_S = 20


def agent_commit(host: Host) -> str:
    """The commit of the checkout whose .venv the host's agent runs from (scripts/lab runs it from the
    checkout that started it), for every row."""
    argv = Path(f"/proc/{host.agent_pid()}/cmdline").read_bytes().split(b"\0")
    binary = Path(next((a.decode() for a in argv if a.endswith(b"kvm-storage-agent")), "."))
    checkout = binary.parent.parent.parent  # CHECKOUT/.venv/bin/kvm-storage-agent
    proc = subprocess.run(
        ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{proc.stdout.strip() or '?'} ({checkout.name})"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/guest-safety", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30, help="migrations per cell (default 30)")
    p.add_argument("--out", type=Path, default=Path("safety-out"), help="results directory (appended to)")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    p.add_argument(
        "--after-harm",
        choices=("stop", "continue"),
        default="stop",
        help="a harmed run stops its cell (default), or the cell goes on with a new guest (harm counted)",
    )
    p.add_argument("--look", metavar="GUEST", help="only look at a guest (kept or any), as for a harmed run")
    args = p.parse_args(argv)
    args.cells = [c for c in args.cells.split(",") if c]
    unknown = set(args.cells) - set(CELLS)
    if unknown:
        p.error(f"unknown cells {sorted(unknown)}; known: {', '.join(CELLS)}")
    return args


async def one_run(lab: Lab, guest: BenchGuest, cell: str, run_no: int) -> Outcome:
    mark = len(memcheck.console_text(guest.name))
    if cell in virshcell.CELLS:
        outcome = await asyncio.to_thread(virshcell.migrate, lab, guest, cell, run_no)
    else:
        outcome = await agentcell.migrate(lab, guest, cell, run_no)
    await asyncio.to_thread(look_after, lab, outcome, mark)
    if outcome.runs_on:
        guest.host = lab.host(outcome.runs_on[0])
        guest.drop_unused_files()
    return outcome


def keep_evidence(lab: Lab, out: Path, outcome: Outcome) -> Path:
    """The guest looked at live (bench/safety/diagnose.py: registers, interrupt controllers and the UART
    twice, the disk writers' records against their acks, where the console goes, an NMI and what follows),
    then its console, QEMU's logs on both hosts and the run's calls. The guest itself is kept running."""
    where = out / "evidence" / f"{outcome.cell}-{outcome.run}-{outcome.guest}"
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy2(console_path(outcome.guest), where / "console-at-harm.log")
    (where / "diagnosis.txt").write_text(diagnose(lab, outcome))
    shutil.copy2(console_path(outcome.guest), where / "console.log")
    for host in lab.hosts:
        qemu_log = host_by_name(host.name).private_dir("/var/log/libvirt") / "qemu" / f"{outcome.guest}.log"
        if qemu_log.exists():
            shutil.copy2(qemu_log, where / f"qemu-{host.name}.log")
    (where / "outcome.json").write_text(json.dumps(outcome.as_json(), indent=2) + "\n")
    return where


async def run_cell(lab: Lab, out: Path, cell: str, runs: int, after_harm: str = "stop") -> None:
    """``runs`` more runs of the cell. A harmed run keeps its guest (running, for a look) and its evidence;
    then the cell stops (``after_harm`` "stop") or goes on with a new guest to its count ("continue": every
    run counts, the harmed ones too)."""
    rows = [r for r in report.load(out) if r["cell"] == cell]
    if after_harm == "stop" and (stopped := [r for r in rows if r["harmed"] or not r["verdictTrue"]]):
        log.error(
            "%s stopped at run %d (harm kept in %s/evidence): not run again", cell, stopped[0]["run"], out
        )
        return
    done = len(rows)
    last = done + runs
    while done < last:
        hot = cell in HOT_CELLS
        with bench_guest(
            lab,
            f"safety-{cell}",
            memory_mib=128,
            dirty_mib_s=8,
            disk_size_mib=256,
            fill_mib=16,
            data_volumes=1 if hot else 0,
            disk_write_mib_s=HOT_WRITE_MIB_S if hot else 0,
        ) as guest:
            while done < last:
                done += 1
                wait_healthy()
                commit = agent_commit(guest.host)
                load = os.getloadavg()
                outcome = await one_run(lab, guest, cell, done)
                row = {**outcome.as_json(), "agentCommit": commit, "loadavg": [round(v, 2) for v in load]}
                with (out / "runs.jsonl").open("a") as sink:
                    sink.write(json.dumps(row) + "\n")
                report.write(out)
                log.info(
                    "%s run %d: %s -> %s %s (%s), runs on %s, stale %d, deaths %d, checker ok after %s, "
                    "%.0f s, load %.1f",
                    cell, done, outcome.src, outcome.dst, outcome.verdict, outcome.detail[:120],
                    outcome.runs_on, outcome.stale_pages, len(outcome.death_lines), outcome.checker_ok_after,
                    outcome.seconds, load[0],
                )  # fmt: skip
                if outcome.harmed or not outcome.verdict_true:
                    # Looked at live first (keep_evidence); a series that goes on does not leave the harmed
                    # guest running: one stray TCG guest takes a core and loads every run after it.
                    guest.keep = after_harm == "stop"
                    where = await asyncio.to_thread(keep_evidence, lab, out, outcome)
                    log.error(
                        "%s run %d HARMED THE GUEST or lied about it: evidence in %s; guest %s %s",
                        cell, done, where, guest.name, "kept" if guest.keep else "destroyed",
                    )  # fmt: skip
                    if after_harm == "stop":
                        return
                    break  # a new guest for the rest


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args = parse(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lab = ensure_lab()
    if args.look:
        seen = Outcome("look", 0, args.look, "", "", verdict="", detail="")
        seen.runs_on = running_on(lab, args.look, within_s=5)
        print(diagnose(lab, seen))
        return 0
    started = time.monotonic()
    for cell in args.cells:
        asyncio.run(run_cell(lab, args.out, cell, args.runs, args.after_harm))
    print(report.write(args.out))
    log.info("done in %.0f s; rows in %s", time.monotonic() - started, args.out / "runs.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
