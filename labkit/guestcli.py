"""`scripts/lab guest create|verify|acks|destroy|list`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import guestcreate, guestdir, guests, memcheck
from .layout import HOSTS
from .sysutil import log


def _create(args: argparse.Namespace) -> int:
    opts = guestcreate.GuestOptions(
        name=args.name,
        host=args.host,
        data_volumes=args.data_volumes,
        snapshots=args.snapshots,
        dirty_mib_s=args.dirty_mib_s,
        dirty_cpu_bound=args.dirty_cpu_bound,
        working_set_mib=args.working_set_mib,
        storage=args.storage,
        disk_size_mib=args.disk_size_mib,
        memory_mib=args.memory_mib,
        fill_mib=args.fill_mib,
        disk_write_mib_s=args.disk_write_mib_s,
        disk_write_dev=args.disk_write_dev,
        disk_write_region_mib=args.disk_write_region_mib,
        disk_write_seconds=args.disk_write_seconds,
        mem_check_mib=args.mem_check_mib,
        mem_check_mib_s=args.mem_check_mib_s,
        boot_timeout=args.boot_timeout,
        keep_on_failure=args.keep_on_failure,
        bare=args.bare,
    )
    guest = guestcreate.create(opts)
    log(f"{guest.name}: {guest.uuid} on {guest.host}, disks {', '.join(d.dev for d in guest.disks)}")
    print(guest.uuid)
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = guests.verify(args.name, suspend=not args.no_suspend)
    for disk in report.disks:
        fills = f"{disk.fill_extents} filler layers ok"
        log(f"{args.name} on {report.host}: {disk.dev}: {disk.records} records, {fills}")
    if report.problems:
        print(f"FAILED: {report.problems[0]}")
        if len(report.problems) > 1:
            print(f"  ... and {len(report.problems) - 1} more problem(s)")
        return 1
    print(f"verified {report.records} records on {len(report.disks)} disks")
    return 0


def _acks(args: argparse.Namespace) -> int:
    summary = guestdir.acks_summary(args.name)
    if args.json:
        print(json.dumps(summary))
    else:
        disks = ", ".join(f"{dev} {count}" for dev, count in summary["disks"].items())
        print(f"{args.name}: {summary['total']} acknowledged writes ({disks}); {summary['boots']} boot(s)")
    return 0


def _memcheck(args: argparse.Namespace) -> int:
    if not memcheck.enabled(args.name):
        print(f"{args.name}: no memory checker (created with --mem-check-mib 0, or not a lab guest)")
        return 1
    since = memcheck.mark(args.name)
    try:
        report = memcheck.fresh(args.name, since, timeout=args.wait)
    except memcheck.MemCheckError as err:
        if args.json:
            print(json.dumps({"name": args.name, "ok": False, "error": str(err)}))
        else:
            print(f"FAILED: {err}")
        return 1
    if args.json:
        summary = {"ok": True, "checked": report.checked, "runningOn": report.running_on}
        print(json.dumps({"name": args.name, **summary, "starts": report.starts}))
    else:
        print(report.describe())
    return 0


def _destroy(args: argparse.Namespace) -> int:
    guests.destroy(args.name)
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = guests.list_guests()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            where = ", ".join(f"{h}: {s}" for h, s in row["hosts"].items()) or "not defined"
            print(f"{row['name']:24} {row['uuid'] or '-':36} {where} acks={row['acks']}")
    return 0


def add_guest_commands(sub: Any) -> None:
    guest = sub.add_parser("guest", help="test guests that write verifiable records")
    gsub = guest.add_subparsers(dest="guest_command", required=True)

    p = gsub.add_parser("create", help="define and start a guest; prints its uuid (last line)")
    p.add_argument("name")
    p.add_argument("--host", default="hostA", choices=[h.name for h in HOSTS])
    p.add_argument("--data-volumes", type=int, default=0, metavar="N")
    p.add_argument("--snapshots", type=int, default=0, metavar="N", help="qcow2 chain of N+1 layers per disk")
    p.add_argument("--dirty-mib-s", type=int, default=0, metavar="N", help="memory dirtying rate (MiB/s)")
    p.add_argument(
        "--dirty-cpu-bound", action="store_true", help="dirty memory as fast as the guest's CPU allows"
    )
    p.add_argument("--working-set-mib", type=int, metavar="N", help="size of the dirtied buffer")
    p.add_argument(
        "--bare", action="store_true", help="no kernel: disks with filler only, next to no CPU (no records)"
    )
    p.add_argument(
        "--storage",
        default="ps1",
        help="storage on that host: ps1, ps2, small, or rbd (raw images in the lab pool)",
    )
    p.add_argument("--disk-size-mib", type=int, default=1024, metavar="N")
    p.add_argument("--memory-mib", type=int, default=256, metavar="N")
    p.add_argument("--fill-mib", type=int, default=4, metavar="N", help="filler data per layer and disk")
    p.add_argument(
        "--disk-write-mib-s",
        type=int,
        default=0,
        metavar="N",
        help="besides the records, rewrite a region of one disk at N MiB/s (a hot disk)",
    )
    p.add_argument("--disk-write-dev", default="vda", metavar="DEV", help="the hot disk (default vda)")
    p.add_argument(
        "--disk-write-region-mib", type=int, default=64, metavar="N", help="rewritten region at the end"
    )
    p.add_argument(
        "--disk-write-seconds", type=int, default=0, metavar="S", help="stop that writer after S s (0: never)"
    )
    p.add_argument(
        "--mem-check-mib",
        type=int,
        default=16,
        metavar="N",
        help="the memory checker's region, MiB (0: no checker)",
    )
    p.add_argument(
        "--mem-check-mib-s", type=int, default=2, metavar="N", help="how fast the checker rewrites it"
    )
    p.add_argument("--boot-timeout", type=float, default=180, metavar="S")
    p.add_argument("--keep-on-failure", action="store_true", help="leave a guest that failed to start")
    p.set_defaults(func=_create)

    p = gsub.add_parser("verify", help="check every acknowledged record on the current disks")
    p.add_argument("name")
    p.add_argument("--no-suspend", action="store_true", help="read a running guest without pausing it")
    p.set_defaults(func=_verify)

    p = gsub.add_parser("acks", help="acknowledged writes per disk")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_acks)

    p = gsub.add_parser(
        "memcheck",
        help="the memory checker: a new ok line and no inconsistency on the console (exit 1 otherwise)",
    )
    p.add_argument("name")
    p.add_argument("--wait", type=float, default=10, metavar="S", help="how long to wait for a new ok line")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_memcheck)

    p = gsub.add_parser("destroy", help="stop, undefine and delete a guest on whatever host has it")
    p.add_argument("name")
    p.set_defaults(func=_destroy)

    p = gsub.add_parser("list", help="guests and where they are")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
