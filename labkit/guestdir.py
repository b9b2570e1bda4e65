"""A test guest's own directory, /var/lib/ksa-lab/guests/NAME/: its record (guest.json: disks, layers,
fillers), its serial console and the writes it acknowledged there.

The directory lies outside the per-host mounts, so it is the same file whichever host runs the domain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .layout import GUESTS_DIR
from .records import DiskAcks, FillExtent, parse_acks
from .sysutil import LabError, write_file


@dataclass
class GuestDisk:
    dev: str
    volume_uuid: str
    layers: list[str]  # image files, base first; the last is the active image <volume-uuid>.qcow2
    fills: list[FillExtent] = field(default_factory=list)


@dataclass
class GuestRecord:
    name: str
    uuid: str
    host: str  # where it was created; it may run elsewhere now
    storage: str
    disk_size_mib: int
    memory_mib: int
    dirty_mib_s: int
    snapshots: int
    fill_mib: int
    disks: list[GuestDisk]
    disk_write_mib_s: int = 0
    disk_write_dev: str = "vda"
    mem_check_mib: int = 0  # the memory checker's region (records written before it existed: none)

    @staticmethod
    def dir_of(name: str) -> Path:
        return GUESTS_DIR / name

    @property
    def dir(self) -> Path:
        return self.dir_of(self.name)

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    def save(self) -> None:
        write_file(self.dir / "guest.json", json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, name: str) -> GuestRecord | None:
        try:
            data = json.loads((cls.dir_of(name) / "guest.json").read_text())
        except (OSError, ValueError):
            return None
        disks = [
            GuestDisk(d["dev"], d["volume_uuid"], d["layers"], [FillExtent(**f) for f in d["fills"]])
            for d in data.pop("disks")
        ]
        return cls(disks=disks, **data)


def console_path(name: str) -> Path:
    return GuestRecord.dir_of(name) / "console.log"


def rolled_over(name: str) -> list[Path]:
    """Pieces rolled off the guest's console (console.log.N): virtlogd does that at its max_size when it
    writes the console (libvirt's stdio_handler "logd"); the lab sets "file" so that nothing does."""
    base = console_path(name)
    return sorted(base.parent.glob(base.name + ".*"))


def read_console(name: str) -> str:
    """The guest's whole serial console. A console that was rolled over is refused: what the guest printed
    after that is in another file, and reading one piece would make a running guest look silent."""
    path = console_path(name)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError as err:
        raise LabError(f"guest {name!r} has no console log ({path})") from err
    if pieces := rolled_over(name):
        raise LabError(
            f"guest {name!r}: its console was rolled over ({', '.join(p.name for p in pieces)} beside "
            f'{path.name}): it cannot be read whole. The lab\'s qemu.conf must say stdio_handler = "file" '
            "(virtlogd rolls a console over at 2 MiB): run scripts/lab up"
        )
    return text


def read_acks(name: str) -> dict[str, DiskAcks]:
    return parse_acks(read_console(name).splitlines())


def acks_summary(name: str) -> dict[str, Any]:
    acks = read_acks(name)
    text = read_console(name)
    return {
        "name": name,
        "total": sum(a.count for a in acks.values()),
        "disks": {dev: a.count for dev, a in acks.items()},
        "highest": {dev: a.highest for dev, a in acks.items()},
        "boots": text.count("KSA-BOOT "),
    }
