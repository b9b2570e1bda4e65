"""The guest's on-disk records and serial-console acknowledgements, and the check that every
acknowledged record is on disk (pure functions: the caller supplies the bytes).

Record N of disk `dev`: one 512-byte sector at byte RECORD_BASE + N * 512 holding the line
``KSA1 <dev> <N> <boot id> <md5 hex of "KSA1 <dev> <N> <boot id>">\\n``, then zeros to the end of the sector.
Acknowledgement, printed on the serial console only after the record was written with O_DIRECT and fsync:
``KSA-ACK <dev> <N> <boot id>``. guest_init.sh writes both; keep the two in step.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

RECORD_SIZE = 512
RECORD_BASE = 1 << 20
MAGIC = "KSA1"
# Anchored at the end of the line with the full boot id, so that a line cut by kernel output is ignored
# rather than misread as a smaller sequence number.
_ACK = re.compile(r"KSA-ACK (vd[a-z]+) (\d+) ([0-9a-f]{32})\s*$")


@dataclass
class DiskAcks:
    """Acknowledged records of one disk: seq -> boot ids that acknowledged it, in console order."""

    dev: str
    by_seq: dict[int, list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.by_seq)

    @property
    def highest(self) -> int | None:
        return max(self.by_seq) if self.by_seq else None


def parse_acks(lines: Iterable[str]) -> dict[str, DiskAcks]:
    """Acknowledgements per disk, from console text that may hold several boots and several hosts."""
    disks: dict[str, DiskAcks] = {}
    for line in lines:
        match = _ACK.search(line)
        if match:
            dev, seq, boot = match.group(1), int(match.group(2)), match.group(3)
            disks.setdefault(dev, DiskAcks(dev)).by_seq.setdefault(seq, []).append(boot)
    return dict(sorted(disks.items()))


def record_offset(seq: int) -> int:
    return RECORD_BASE + seq * RECORD_SIZE


def checksum(dev: str, seq: int, boot: str) -> str:
    return hashlib.md5(f"{MAGIC} {dev} {seq} {boot}".encode(), usedforsecurity=False).hexdigest()


def encode_record(dev: str, seq: int, boot: str) -> bytes:
    line = f"{MAGIC} {dev} {seq} {boot} {checksum(dev, seq, boot)}\n".encode()
    return line.ljust(RECORD_SIZE, b"\0")


def record_problem(data: bytes, dev: str, seq: int, boot: str) -> str | None:
    """None if `data` is exactly the record the guest acknowledged, else what is wrong with it."""
    if len(data) != RECORD_SIZE:
        return f"short read ({len(data)} bytes)"
    if not data.strip(b"\0"):
        return "missing (the sector is all zeros)"
    line, newline, rest = data.partition(b"\n")
    fields = line.decode(errors="replace").split(" ")
    if not newline or len(fields) != 5 or fields[0] != MAGIC:
        return f"corrupt (not a record: {data[:48]!r})"
    _, got_dev, got_seq, got_boot, got_sum = fields
    if got_sum != checksum(got_dev, int(got_seq) if got_seq.isdigit() else -1, got_boot):
        return "corrupt (checksum mismatch)"
    if rest.strip(b"\0"):
        return "corrupt (garbage after the record line)"
    if (got_dev, got_seq) != (dev, str(seq)):
        return f"wrong record (holds {got_dev} #{got_seq})"
    if got_boot != boot:
        return f"overwritten (holds the record of boot {got_boot})"
    return None


@dataclass(frozen=True)
class FillExtent:
    """Filler the host wrote into one layer of a disk's chain (layer 0 = base) before the guest saw it."""

    layer: int
    offset: int
    length: int
    pattern: int


@dataclass
class DiskResult:
    dev: str
    records: int = 0
    fill_extents: int = 0
    problems: list[str] = field(default_factory=list)


Reader = Callable[[int, int], bytes]


def verify_disk(dev: str, acks: DiskAcks, read: Reader, fills: Iterable[FillExtent] = ()) -> DiskResult:
    """Check every acknowledged record of one disk, in sequence order, and the filler of each layer."""
    result = DiskResult(dev)
    for seq in sorted(acks.by_seq):
        boots = acks.by_seq[seq]
        boot = boots[-1]
        if len(set(boots)) > 1:
            result.problems.append(
                f"record {dev} #{seq}: acknowledged by boot {boots[0]} and again by boot {boot}: "
                "the first acknowledged write was lost before the guest rebooted"
            )
        problem = record_problem(read(record_offset(seq), RECORD_SIZE), dev, seq, boot)
        if problem:
            result.problems.append(f"record {dev} #{seq} (acknowledged by boot {boot}): {problem}")
        else:
            result.records += 1
    for fill in fills:
        data = read(fill.offset, fill.length)
        if data != bytes([fill.pattern]) * fill.length:
            bad = next((i for i, b in enumerate(data) if b != fill.pattern), len(data))
            result.problems.append(
                f"filler of layer {fill.layer} on {dev} at byte {fill.offset + bad}: "
                f"expected 0x{fill.pattern:02x} (a layer of the backing chain is missing or damaged)"
            )
        else:
            result.fill_extents += 1
    return result
