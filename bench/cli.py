"""`scripts/bench [--quick] [--out DIR] [--cases 1,2,3,4,5,6,7,9]`: run the cases on the lab, print the table,
write table.md, results.json and migration-progress.png into DIR."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.context import FULL, QUICK, Context, Settings
from bench.labenv import REPO, BenchError, ensure_lab, run
from bench.table import Row, render_markdown, verdicts
from labkit.mgmtplane import CallbackRecorder

log = logging.getLogger("bench")

CASES: dict[str, tuple[str, str]] = {
    "1": ("bench.cases.samehost", "same-host move vs virsh blockcopy and qemu-img convert"),
    "2": ("bench.cases.bandwidth", "thin disks under one cap vs virsh blockcopy/migrate --bandwidth"),
    "3": ("bench.cases.transfer", "cross-host transfer of one layer vs qemu-img convert to NBD"),
    "4": ("bench.cases.livemig", "live migration at several dirty rates: auto vs precopy"),
    "5": ("bench.cases.overhead", "agent CPU and API latency"),
    "6": ("bench.cases.tls", "live migration with TLS vs insecure_transport, and vs virsh migrate [--tls]"),
    "7": ("bench.cases.hotdisk", "hot disk at 2.5 x its cap vs virsh blockcopy/migrate [synchronous writes]"),
    "8": (
        "bench.cases.rbd",
        "onto Ceph RBD and pool to pool vs virsh blockcopy --reuse-external, qemu-img convert",
    ),
    "9": ("bench.cases.evacuation", "host evacuation of 4 VMs under one budget vs virsh migrate --bandwidth"),
}
PLOT_FILE = "migration-progress.png"


def machine() -> dict[str, Any]:
    """The machine the figures come from (they mean little on another one)."""

    def first_line(argv: list[str]) -> str:
        try:
            return run(argv, timeout=30).stdout.strip().splitlines()[0]
        except (BenchError, IndexError, OSError):
            return "unknown"

    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if "MemTotal" in line
        ),
        0,
    )
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "memoryGiB": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "libvirt": first_line(["libvirtd", "--version"]),
        "qemu": first_line(["qemu-system-x86_64", "--version"]),
        "python": platform.python_version(),
        "commit": first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "loadavg": list(os.getloadavg()),
    }


async def _run_cases(settings: Settings, wanted: list[str]) -> tuple[Context, list[Row], list[str]]:
    lab = ensure_lab()
    rows: list[Row] = []
    failures: list[str] = []
    with CallbackRecorder() as receiver:
        ctx = Context(lab, receiver, settings)
        for number in wanted:
            module_name, title = CASES[number]
            log.info("case %s: %s", number, title)
            started = time.monotonic()
            try:
                ctx.lab = await asyncio.to_thread(ensure_lab)  # uuids are new if the lab was rebuilt
                module = importlib.import_module(module_name)
                case: Callable[[Context], Awaitable[list[Row]]] = module.run_case
                rows += await case(ctx)
            except Exception as err:  # one broken case must not hide the others' figures
                log.error("case %s failed: %s\n%s", number, err, traceback.format_exc())
                failures.append(f"case {number}: {err}")
                rows.append(Row(number, title, "-", "-", "", not_measured=f"the case failed: {err}"))
            log.info("case %s took %.0f s", number, time.monotonic() - started)
    return ctx, rows, failures


def write_outputs(
    out: Path, settings: Settings, ctx: Context, rows: list[Row], info: dict[str, Any], failures: list[str]
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = render_markdown(rows)
    m = info["machine"]
    header = (
        f"Benchmark ({settings.mode} mode), {info['finished']}, commit {m['commit']}, {m['nproc']} CPUs, "
        f"{m['memoryGiB']} GiB, kernel {m['kernel']}, {m['libvirt']}, {m['qemu']}\n\n"
    )
    plot_name = None
    if ctx.plot_runs:
        try:
            from bench.plot import plot_migration

            plot_migration(ctx.plot_runs, out / PLOT_FILE)
            plot_name = PLOT_FILE
        except Exception as err:
            log.error("plot failed: %s\n%s", err, traceback.format_exc())
            failures.append(f"plot: {err}")
    for name, draw in ctx.figures.items():
        try:
            draw(out / name)
        except Exception as err:
            log.error("figure %s failed: %s\n%s", name, err, traceback.format_exc())
            failures.append(f"figure {name}: {err}")
    (out / "table.md").write_text(header + table)
    doc = {
        **info,
        "mode": settings.mode,
        "settings": settings.__dict__,
        "rows": [row.to_json() for row in rows],
        "verdicts": verdicts(rows),
        "failures": failures,
        "raw": ctx.raw,
        "cpu": [use.__dict__ for use in ctx.cpu],
        "plot": plot_name,
        "plotSeries": ctx.plot_runs,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return header + table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes (minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out", help="where to write the results")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated case numbers (default: all)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s bench %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        print(f"bench: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: run as root (the lab, virsh, ip netns)", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else FULL
    info: dict[str, Any] = {"started": _now(), "machine": machine(), "cases": wanted}
    started = time.monotonic()
    try:
        ctx, rows, failures = asyncio.run(_run_cases(settings, wanted))
    except BenchError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1
    info["finished"] = _now()
    info["seconds"] = round(time.monotonic() - started)
    info["loadavgEnd"] = list(os.getloadavg())
    text = write_outputs(args.out, settings, ctx, rows, info, failures)
    print(text)
    for line in verdicts(rows):
        print(line)
    print(f"\nwritten to {args.out}/ (table.md, results.json{', ' + PLOT_FILE if ctx.plot_runs else ''})")
    return 1 if failures else 0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
