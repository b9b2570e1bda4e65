"""Test guests once they exist: verify (every acknowledged write on the current disks), destroy, list.
Creating one is ``guestcreate``; its record, console and acknowledgements are in ``guestdir``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ceph, domain
from .domain import Placement
from .guestdir import GuestRecord, acks_summary, read_acks
from .layout import GUESTS_DIR, HOSTS, LAB_DIR, STORAGE_ROOTS, TMP_DIR
from .records import DiskResult, verify_disk
from .sysutil import LabError, log, run
from .virsh import virsh

# --- verify -----------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    host: str
    records: int
    disks: list[DiskResult]

    @property
    def problems(self) -> list[str]:
        return [p for d in self.disks for p in d.problems]


def verify(name: str, *, suspend: bool = True) -> VerifyReport:
    """Check every acknowledged record of the guest on its disks' current images (whole backing chain).
    A running guest is paused while its images are read (QEMU drains and flushes on pause) and resumed."""
    placement = domain.locate(name)
    guest = GuestRecord.load(name)
    paused_here = False
    if suspend and placement.state == "running":
        virsh(placement.host, "suspend", name)
        paused_here = True
    try:
        xml = domain.current_xml(placement, name)
        acks = read_acks(name)  # after the pause: nothing is acknowledged that is not on disk yet
        disks = {d.dev: d for d in domain.disks_in_xml(xml)}
        results = []
        with tempfile.TemporaryDirectory(dir=_tmp_dir()) as tmp:
            for dev, disk_acks in acks.items():
                if dev not in disks:
                    results.append(
                        DiskResult(
                            dev,
                            problems=[
                                f"disk {dev}: acknowledged writes, but the domain "
                                f"on {placement.host.name} has no such disk"
                            ],
                        )
                    )
                    continue
                raw = Path(tmp) / f"{dev}.raw"
                read_raw(disks[dev], raw)
                fills = next((d.fills for d in guest.disks if d.dev == dev), []) if guest else []
                with raw.open("rb") as handle:
                    results.append(verify_disk(dev, disk_acks, _reader(handle.fileno()), fills))
                raw.unlink()
    finally:
        if paused_here:
            virsh(placement.host, "resume", name)
    return VerifyReport(placement.host.name, sum(r.records for r in results), results)


def read_raw(disk: domain.DiskInXml, out: Path) -> None:
    """The disk's current image (its whole backing chain) as a raw file ``out``, read from the root
    namespace: a file, a block device (by its path), or an RBD image as the lab's Ceph admin reads it
    (``disk.path`` is then ``ceph.qemu_uri``). -U: QEMU holds the image; a caller that wants a consistent read
    pauses the guest first (QEMU drains and flushes on pause)."""
    run(["qemu-img", "convert", "-U", "-f", disk.fmt, "-O", "raw", disk.path, out], timeout=600)


def _reader(fd: int) -> Callable[[int, int], bytes]:
    return lambda offset, length: os.pread(fd, length, offset)


def _tmp_dir() -> Path:
    TMP_DIR.mkdir(parents=True, exist_ok=True)
    return TMP_DIR


# --- destroy and list -------------------------------------------------------------------------------------


def _chain_files(top: str) -> list[str]:
    proc = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", top], check=False)
    if proc.returncode != 0:
        return [top]
    info = json.loads(proc.stdout)
    return [entry["filename"] for entry in (info if isinstance(info, list) else [info])]


def _remove_rbd_images(name: str, images: list[str]) -> None:
    """The RBD images the guest was created on (``guest create --storage rbd``), once no domain has them
    open; an image a move made is the test's to remove."""
    for image in images:
        pool, image_name = image.removeprefix("rbd:").split("/", 1)
        try:
            if image_name in ceph.rbd_images(pool):
                ceph.rbd_remove(image_name, pool)
        except LabError as err:
            log(f"{name}: RBD image {pool}/{image_name} not removed: {err}")


def destroy(name: str, *, quiet: bool = False) -> None:
    """Stop and undefine the domain on every lab host, and delete its image files and its guest dir.
    Only files under the lab directory are ever deleted."""
    files: set[str] = set()
    for place in domain.placements(name):
        for flag in ((), ("--inactive",)):
            xml = virsh(place.host, "dumpxml", *flag, name, check=False)
            if xml.strip():
                for disk in domain.disks_in_xml(xml):
                    if disk.kind == "rbd":  # no file of its own (the image stays in the pool)
                        files.update(p for p in disk.chain if p.startswith("/"))
                        continue
                    files.update(_chain_files(disk.path) if Path(disk.path).exists() else disk.chain)
        if place.active:
            virsh(place.host, "destroy", name, check=False)
        virsh(place.host, "undefine", name, "--snapshots-metadata", check=False)
    guest = GuestRecord.load(name)
    if guest is not None:
        _remove_rbd_images(name, [p for d in guest.disks for p in d.layers if p.startswith("rbd:")])
        names = {Path(p).name for d in guest.disks for p in d.layers if not p.startswith("rbd:")}
        files.update(p for d in guest.disks for p in d.layers)
        for host in HOSTS:  # copies the agent made elsewhere keep the names
            for root, _, _ in STORAGE_ROOTS:
                files.update(str(host.storage_path(root) / n) for n in names)
    for path in files:
        if Path(path).is_absolute() and Path(path).resolve().is_relative_to(LAB_DIR) and Path(path).is_file():
            Path(path).unlink()
    shutil.rmtree(GuestRecord.dir_of(name), ignore_errors=True)
    if not quiet:
        log(f"{name}: destroyed")


def list_guests() -> list[dict[str, Any]]:
    names = {p.name for p in GUESTS_DIR.iterdir() if p.is_dir()} if GUESTS_DIR.exists() else set()
    for host in HOSTS:
        names.update(n for n in virsh(host, "list", "--all", "--name", check=False, timeout=30).split() if n)
    rows = []
    for name in sorted(names):
        found: list[Placement] = domain.placements(name)
        guest = GuestRecord.load(name)
        rows.append(
            {
                "name": name,
                "uuid": guest.uuid if guest else None,
                "hosts": {p.host.name: p.state for p in found},
                "acks": acks_summary(name)["total"] if guest else None,
                "labGuest": guest is not None,
            }
        )
    return rows
