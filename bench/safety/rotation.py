"""Does a lab guest's console go on across a migration once it is past virtlogd's rotation size?

`python -m bench.safety.rotation [--runs N]` (needs the lab). The lab guest's serial console is a
`<serial type='file'>`; with libvirt's default `stdio_handler = "logd"`, QEMU does not write that file
itself: it writes into a pipe of its host's virtlogd, which appends to the file and rolls it over
(console.log -> console.log.0, a new console.log) when what it counts passes `max_size` (2 MiB by default).
Each host's virtlogd counts from the file's size when it opened it. So the first time a guest's console
passes 2 MiB, its output goes on in a new, short console.log (or, when the source's virtlogd rolled over
while the destination's held the old file, in console.log.0): a reader that looks at console.log after a
mark sees nothing more: "the guest went silent after the switchover", with no kernel report and no checker
line, while the guest runs on.

The experiment: one guest (the guest-safety shape), its console padded past 2 MiB with lines no parser
reads, then migrated with plain `virsh` (cell `fixed300`) and judged exactly as guest-safety judges a run;
the console's pieces and the guest's lines in each are printed. With `stdio_handler = "file"` in the lab's
qemu.conf (QEMU appends to the file itself, nothing rolls it over) the same run must stay clean."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

from bench.labenv import Host, bench_guest, ensure_lab
from bench.safety import virshcell
from bench.safety.observe import PANIC_SIGNS, running_on
from labkit import memcheck
from labkit.guestdir import console_path
from labkit.layout import host_by_name

log = logging.getLogger("rotation")
ROTATE_AT = 2 * 1024 * 1024  # virtlogd's default max_size
JUDGE_AFTER_S = 20  # what guest-safety waits at most for a new checker line and new acks
PAD_LINE = "ksa-pad " + "." * 55 + "\n"  # 64 bytes; no KSA- prefix: no parser reads it


def pad_past_rotation(name: str) -> int:
    path = console_path(name)
    missing = ROTATE_AT + 4096 - path.stat().st_size
    if missing > 0:
        with path.open("a") as console:
            console.write(PAD_LINE * (missing // len(PAD_LINE) + 1))
    return path.stat().st_size


def stdio_handler(host: Host) -> str:
    conf = (host_by_name(host.name).private_dir("/etc/libvirt") / "qemu.conf").read_text()
    found = re.search(r'^stdio_handler\s*=\s*"(\w+)"', conf, re.M)
    return found.group(1) if found else "logd (libvirt's default)"


def pieces(name: str) -> dict[str, str]:
    base = console_path(name)
    found = {}
    for path in sorted(base.parent.glob(base.name + "*")):
        text = path.read_text(errors="replace")
        ksa = [ln for ln in text.splitlines() if ln.startswith("KSA-")]
        found[path.name] = f"{len(text)} bytes, {len(ksa)} KSA lines, last {ksa[-1][:80] if ksa else None!r}"
    return found


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(prog="python -m bench.safety.rotation", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1, help="padded migrations, one guest each")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    lab = ensure_lab()
    results = []
    for run_no in range(1, args.runs + 1):
        with bench_guest(
            lab, "safety-rotation", memory_mib=128, dirty_mib_s=8, disk_size_mib=256, fill_mib=16
        ) as guest:
            memcheck.fresh(guest.name, memcheck.mark(guest.name))  # it runs and checks before the pad
            size = pad_past_rotation(guest.name)
            log.info("%s: console padded to %d bytes; pieces %s", guest.name, size, pieces(guest.name))
            mark = console_path(guest.name).stat().st_size
            outcome = virshcell.migrate(lab, guest, "fixed300", run_no)
            time.sleep(JUDGE_AFTER_S)
            # What the lab's readers saw before they refused a rolled-over console
            after = console_path(guest.name).read_bytes()[mark:].decode(errors="replace")
            runs_on = running_on(lab, guest.name)
            row: dict[str, object] = {
                "run": run_no,
                "guest": guest.name,
                "verdict": outcome.verdict,
                "runsOn": runs_on,
                "paddedTo": size,
                "afterMark": {
                    "memOk": len(memcheck.OK.findall(after)),
                    "acks": after.count("KSA-ACK "),
                    "deaths": [ln for ln in after.splitlines() if any(s in ln for s in PANIC_SIGNS)],
                },
                "consolePieces": pieces(guest.name),
                "stdioHandler": stdio_handler(guest.host),
            }
            log.info("%s", json.dumps(row, indent=2))
            results.append(row)
            if runs_on:
                guest.host = lab.host(runs_on[0])
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
