"""A harmed guest, looked at while it is still there (issue 21: the guest that went silent after a switchover,
no kernel report, no checker line). Is its vCPU still running, and is it only its serial console that stopped?

Every writer in the guest (the disk writers, the dirtier, the memory checker, the heartbeat) prints on
/dev/ttyS0, the 16550 UART that QEMU emulates, through the tty layer, which sends by interrupt (THRE). If that
interrupt is lost across the switchover, the tty's buffer fills, every writer blocks in write(2) and the guest
looks dead while its kernel runs. The kernel's own console (printk) polls the UART instead, and on the way
out it writes IER again, which makes QEMU raise the THRE interrupt once more.

So, twice a few seconds apart: libvirt's state and reason, the vCPU's registers (does RIP move; is it
halted, with interrupts on), the interrupt controllers (`info irq`, `info pic`, `info lapic`, `info
ioapic`), the UART's registers read through HMP's port read (LCR, IER, LSR, MCR: reads without side effects
on the transmitter), the console's size, and the disk writers' records on the disk image against the last
one acknowledged on the console (a writer writes its record, then prints its ack: records beyond the last
ack mean the guest ran on after its console went quiet). Then where the console goes on the running side
(the domain XML's serial device, QEMU's -chardev argument and the file its descriptor names), and last an
NMI (`virsh inject-nmi`): a live kernel prints "NMI received for unknown reason" on its polled console
(loglevel 1 shows it: it is pr_emerg) and, by the IER write, kicks the transmitter; if the writers' lines
then flow again, the guest was alive and only its serial interrupt was lost."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench.labenv import Host, Lab
from bench.safety.observe import Outcome
from labkit import memcheck
from labkit.domain import disks_in_xml
from labkit.guestdir import console_path, read_acks
from labkit.layout import TMP_DIR
from labkit.records import RECORD_SIZE, record_offset, record_problem

HMP = ("info status", "info registers", "info cpus", "info irq", "info pic", "info lapic", "info ioapic")
#: UART registers at COM1 (0x3f8) that can be read without changing the transmitter's state: LCR, IER (DLAB
#: 0), MCR, LSR (a read clears only the overrun/break bits). Never IIR: reading it clears a pending THRE.
UART_PORTS = (("LCR", 0x3FB), ("IER", 0x3F9), ("MCR", 0x3FC), ("LSR", 0x3FD))
_RIP = re.compile(r"\bRIP=([0-9a-f]+)")


def qemu_pid(name: str) -> int | None:
    """The QEMU process of the domain (both lab hosts run on this machine; only one runs it after a move)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and f"guest={name},".encode() in b" ".join(argv):
            return int(entry.name)
    return None


def console_route(host: Host, name: str) -> list[str]:
    """Where the guest's serial output goes on the running side."""
    notes = []
    xml = host.virsh("dumpxml", name, check=False)
    try:
        for dev in ET.fromstring(xml).findall("./devices/*"):
            if dev.tag in ("serial", "console"):
                notes.append(f"domain XML on {host.name}: " + ET.tostring(dev, encoding="unicode").strip())
    except ET.ParseError:
        notes.append(f"domain XML on {host.name}: unreadable: {xml[:200]!r}")
    pid = qemu_pid(name)
    if pid is None:
        return [*notes, "no QEMU process for the domain"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    wanted = ("serial", "isa-serial", "fdset")
    args = [f"{a} {b}" for a, b in itertools.pairwise(argv) if a[:1] == "-" and any(w in b for w in wanted)]
    notes.append(f"QEMU pid {pid}: {' '.join(args)}")
    console = str(console_path(name))
    for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(("pipe:", "/dev/pts", "/dev/ptmx")) or "console" in target or target == console:
            flags = (Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("\n")[1:2] or [""])[0]
            notes.append(f"QEMU fd {fd.name} -> {target} ({flags.strip()})")
    notes.extend(console_files(name))
    try:
        st = os.stat(console)
        age = time.time() - st.st_mtime
        notes.append(f"console file {console}: {st.st_size} bytes, modified {age:.1f} s ago")
    except OSError as err:
        notes.append(f"console file {console}: {err}")
    return notes


def console_files(name: str) -> list[str]:
    """The console and any piece rotated off it (virtlogd renames console.log to console.log.0 at its
    max_size), with inodes, and which processes hold which of them open (QEMU, each host's virtlogd)."""
    notes = []
    base = console_path(name)
    for path in sorted(base.parent.glob(base.name + "*")):
        st = path.stat()
        age = time.time() - st.st_mtime
        notes.append(f"{path.name}: {st.st_size} bytes, inode {st.st_ino}, modified {age:.1f} s ago")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
                if str(base.parent) in target:
                    notes.append(
                        f"pid {entry.name} ({comm}) fd {fd.name} -> {target} (inode {fd.stat().st_ino})"
                    )
            except OSError:
                continue
    return notes


def records_on_disk(host: Host, name: str) -> list[str]:
    """Per disk: the last record acknowledged on the console and the last valid record on the image."""
    notes = []
    acks = read_acks(name)
    disks = {d.dev: d for d in disks_in_xml(host.virsh("dumpxml", name, check=False))}
    TMP_DIR.mkdir(parents=True, exist_ok=True)
    for dev, disk_acks in sorted(acks.items()):
        if dev not in disks or disk_acks.highest is None:
            continue
        boot = disk_acks.by_seq[disk_acks.highest][-1]
        with tempfile.TemporaryDirectory(dir=TMP_DIR) as tmp:
            raw = Path(tmp) / f"{dev}.raw"
            proc = subprocess.run(
                ["qemu-img", "convert", "-U", "-f", disks[dev].fmt, "-O", "raw", disks[dev].path, str(raw)],
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
            if proc.returncode != 0:
                notes.append(f"{dev}: could not read {disks[dev].path}: {proc.stderr.strip()}")
                continue
            seq = disk_acks.highest
            with raw.open("rb") as handle:
                while not record_problem(
                    os.pread(handle.fileno(), RECORD_SIZE, record_offset(seq + 1)), dev, seq + 1, boot
                ):
                    seq += 1
        notes.append(
            f"{dev}: last record acknowledged on the console #{disk_acks.highest}, last valid record on "
            f"the image #{seq} ({seq - disk_acks.highest} written after the last ack)"
        )
    return notes


def look(host: Host, name: str) -> tuple[list[str], str | None]:
    notes = [f"domstate --reason: {host.virsh('domstate', '--reason', name, check=False).strip()}"]
    rip = None
    for hmp in HMP:
        text = host.virsh("qemu-monitor-command", name, "--hmp", hmp, check=False).rstrip()
        notes.append(f"-- {hmp}\n{text}")
        if hmp == "info registers" and (found := _RIP.search(text)):
            rip = found.group(1)
    ports = []
    for label, port in UART_PORTS:
        text = host.virsh("qemu-monitor-command", name, "--hmp", f"i /b {port:#x}", check=False).strip()
        ports.append(f"{label}={text.split(':')[-1].strip() if ':' in text else text}")
    notes.append("UART (COM1): " + ", ".join(ports))
    text = memcheck.console_text(name)
    last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
    notes.append(f"console: {len(text)} chars, last line {last[0][:160]!r}")
    notes.extend(records_on_disk(host, name))
    return notes, rip


def diagnose(lab: Lab, outcome: Outcome, gap_s: float = 5, after_nmi_s: float = 15) -> str:
    """The notes described above, as text (also when the guest runs nowhere: then only that)."""
    notes: list[str] = []
    if len(outcome.runs_on) != 1:
        return f"the domain runs on {outcome.runs_on or 'no host'}: nothing to look at live\n"
    host = lab.host(outcome.runs_on[0])
    name = outcome.guest
    rips = []
    for attempt in (1, 2):
        notes.append(f"==== look {attempt} ({time.strftime('%H:%M:%S')}), on {host.name}")
        seen, rip = look(host, name)
        notes.extend(seen)
        rips.append(rip)
        if attempt == 1:
            time.sleep(gap_s)
    notes.append(f"==== RIP across the looks: {rips} ({'moves' if len(set(rips)) > 1 else 'SAME'})")
    notes.append("==== where the console goes")
    notes.extend(console_route(host, name))
    before = len(memcheck.console_text(name))
    acks_before = sum(a.count for a in read_acks(name).values())
    notes.append(f"==== virsh inject-nmi ({time.strftime('%H:%M:%S')})")
    notes.append(host.virsh("inject-nmi", name, check=False).strip() or "(done)")
    time.sleep(after_nmi_s)
    text = memcheck.console_text(name)[before:]
    acks_after = sum(a.count for a in read_acks(name).values())
    lines = text.splitlines()
    notes.append(
        f"==== {after_nmi_s:.0f} s after the NMI: {len(text)} new console chars, {len(lines)} lines, "
        f"acks {acks_before} -> {acks_after}; NMI line: "
        f"{[ln for ln in lines if 'NMI' in ln][:3] or 'none'}; first lines: {lines[:8]}; "
        f"last lines: {lines[-4:]}"
    )
    seen, _ = look(host, name)
    notes.append("==== look 3 (after the NMI)")
    notes.extend(seen)
    return "\n".join(notes) + "\n"
