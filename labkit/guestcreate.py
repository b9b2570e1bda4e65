"""Creating a test guest: its disks (a snapshot chain of pre-filled layers), its domain, its boot, and the
live snapshots taken while it writes."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ceph, domain, image
from .domain import DiskDef
from .guestdir import GuestDisk, GuestRecord, read_acks
from .guests import destroy
from .layout import CEPH_ADDRESS, CEPH_MON_PORTS, CEPH_POOL, CEPH_USER, STORAGE_ROOTS, host_by_name
from .records import FillExtent
from .state import LabState
from .sysutil import LabError, log, run, wait_for
from .virsh import virsh

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MIB = 1 << 20


@dataclass(frozen=True)
class GuestOptions:
    name: str
    host: str = "hostA"
    data_volumes: int = 0
    snapshots: int = 0
    dirty_mib_s: int = 0
    dirty_cpu_bound: bool = False  # dirty as fast as the vCPU goes (overrides dirty_mib_s)
    working_set_mib: int | None = None  # the dirtied tmpfs buffer; default a quarter of memory, <= 48
    storage: str = "ps1"
    disk_size_mib: int = 1024
    memory_mib: int = 256
    fill_mib: int = 4
    disk_write_mib_s: int = 0  # a writer rewriting the last disk_write_region_mib of disk_write_dev
    disk_write_dev: str = "vda"
    disk_write_region_mib: int = 64
    disk_write_seconds: int = 0  # stop the writer after this long (0: never)
    mem_check_mib: int = 16  # the memory checker's region (0: no checker; labkit/memcheck.c)
    mem_check_mib_s: int = 2  # how fast the checker rewrites it
    boot_timeout: float = 180.0
    keep_on_failure: bool = False
    #: No kernel: the firmware finds nothing to boot and idles, so the guest costs next to no CPU under TCG.
    #: Its disks hold the filler only (no records, no memory checker): for moves whose bytes are what is
    #: measured (tests/lab/test_host_budget.py), checked with qemu-img compare.
    bare: bool = False


#: ``--storage rbd``: the guest's disks are raw images in the lab's Ceph pool (named by their volume uuids).
RBD_STORAGE = "rbd"


def _check_options(opts: GuestOptions) -> None:
    if not NAME_RE.match(opts.name):
        raise LabError(f"bad guest name {opts.name!r}: letters, digits, _ . - (max 63)")
    known = [name for name, _, _ in STORAGE_ROOTS] + [RBD_STORAGE]
    if opts.storage not in known:
        raise LabError(f"no storage {opts.storage!r} (known: {', '.join(known)})")
    if opts.storage == RBD_STORAGE and opts.snapshots:
        raise LabError("--storage rbd: one raw image per disk, no --snapshots (a qcow2 chain needs files)")
    if not 0 <= opts.data_volumes <= 20 or not 0 <= opts.snapshots <= 20 or opts.dirty_mib_s < 0:
        raise LabError("--data-volumes and --snapshots must be 0..20, --dirty-mib-s >= 0")
    if opts.disk_size_mib // 2 < max(4, (opts.snapshots + 1) * opts.fill_mib):
        raise LabError(
            "--disk-size-mib too small: half of each disk holds records, the other half the filler"
        )
    if opts.disk_write_mib_s < 0 or opts.disk_write_region_mib < 1:
        raise LabError("--disk-write-mib-s must be >= 0 and --disk-write-region-mib >= 1")
    if opts.disk_write_mib_s and opts.disk_write_dev not in _devs(opts):
        raise LabError(f"--disk-write-dev {opts.disk_write_dev}: the guest has {', '.join(_devs(opts))}")
    filler_end = opts.disk_size_mib // 2 + (opts.snapshots + 1) * opts.fill_mib
    if opts.disk_write_mib_s and filler_end + opts.disk_write_region_mib > opts.disk_size_mib:
        raise LabError("--disk-write-region-mib too large: it would overwrite the filler of the chain")
    if opts.working_set_mib is not None and not 8 <= opts.working_set_mib <= opts.memory_mib // 2:
        raise LabError("--working-set-mib must be 8 .. half of --memory-mib")
    if not 0 <= opts.mem_check_mib <= opts.memory_mib // 4 or opts.mem_check_mib_s < 1:
        raise LabError("--mem-check-mib must be 0 .. a quarter of --memory-mib, --mem-check-mib-s >= 1")
    if opts.bare and (opts.snapshots or opts.dirty_mib_s or opts.dirty_cpu_bound or opts.disk_write_mib_s):
        raise LabError("--bare: no kernel runs, so no snapshots taken while writing, no dirtying, no writer")
    if opts.memory_mib < 96:
        raise LabError("--memory-mib must be at least 96")
    if GuestRecord.dir_of(opts.name).exists() or domain.placements(opts.name):
        raise LabError(f"a guest named {opts.name!r} exists already")


def _devs(opts: GuestOptions) -> list[str]:
    return [f"vd{chr(ord('a') + i)}" for i in range(opts.data_volumes + 1)]


def _qemu_img_create(path: Path, size_mib: int, fill: FillExtent) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{size_mib}M"])
    command = f"write -P 0x{fill.pattern:02x} {fill.offset} {fill.length}"
    run(["qemu-io", "-f", "qcow2", "-c", command, path])


def _make_rbd_image(disk: GuestDisk, opts: GuestOptions, name: str) -> None:
    """The disk as one raw image in the lab's pool, filled as a base layer is, written as the admin."""
    fill = FillExtent(layer=0, offset=opts.disk_size_mib * MIB // 2, length=opts.fill_mib * MIB, pattern=0x41)
    uri = ceph.qemu_uri(name)
    disk.layers.append(f"rbd:{CEPH_POOL}/{name}")  # before it exists: a failed creation removes it
    run(["qemu-img", "create", "-q", "-f", "raw", uri, f"{opts.disk_size_mib}M"])
    run(["qemu-io", "-f", "raw", "-c", f"write -P 0x{fill.pattern:02x} {fill.offset} {fill.length}", uri])
    disk.fills.append(fill)


def _make_layer(disk: GuestDisk, opts: GuestOptions, layer: int, path: Path, backing: Path | None) -> None:
    """One layer with its own filler; an overlay is filled before it gets its backing file, so that the
    filler write never opens (or needs) the layer below, which QEMU may be using."""
    base = opts.disk_size_mib * MIB // 2
    fill = FillExtent(
        layer=layer,
        offset=base + layer * opts.fill_mib * MIB,
        length=opts.fill_mib * MIB,
        pattern=0x41 + layer,
    )
    _qemu_img_create(path, opts.disk_size_mib, fill)
    if backing is not None:
        run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, path])
    disk.layers.append(str(path))
    disk.fills.append(fill)


def create(opts: GuestOptions) -> GuestRecord:
    _check_options(opts)
    host = host_by_name(opts.host)
    on_rbd = opts.storage == RBD_STORAGE
    root = host.storage_path(opts.storage)
    lab = LabState.load()
    if on_rbd and lab is None:
        raise LabError("no lab state: is the lab up? (scripts/lab up)")
    if not on_rbd and not root.is_dir():
        raise LabError(f"{root} does not exist: is the lab up? (scripts/lab up)")
    img = image.ensure_image()
    devs = _devs(opts)
    # Layer file names: the lower layers are named like snapshots, the active one after the volume.
    plan = {dev: [str(uuid.uuid4()) for _ in range(opts.snapshots)] + [str(uuid.uuid4())] for dev in devs}
    guest = GuestRecord(
        name=opts.name,
        uuid=str(uuid.uuid4()),
        host=host.name,
        storage=opts.storage,
        disk_size_mib=opts.disk_size_mib,
        memory_mib=opts.memory_mib,
        dirty_mib_s=opts.dirty_mib_s,
        snapshots=opts.snapshots,
        fill_mib=opts.fill_mib,
        disks=[GuestDisk(dev, plan[dev][-1], []) for dev in devs],
        disk_write_mib_s=opts.disk_write_mib_s,
        disk_write_dev=opts.disk_write_dev,
        mem_check_mib=opts.mem_check_mib,
    )
    guest.dir.mkdir(parents=True)
    guest.console.touch()
    guest.save()
    try:
        for disk in guest.disks:
            if on_rbd:
                _make_rbd_image(disk, opts, plan[disk.dev][0])
                guest.save()
            else:
                _make_layer(disk, opts, 0, root / f"{plan[disk.dev][0]}.qcow2", None)
        guest.save()
        ws = opts.working_set_mib or max(8, min(48, opts.memory_mib // 4))
        dirty = "max" if opts.dirty_cpu_bound else str(opts.dirty_mib_s)
        args = f"ksa.disks={len(devs)} ksa.dirty={dirty} ksa.ws={ws}"
        args += f" ksa.memmib={opts.mem_check_mib} ksa.memrate={opts.mem_check_mib_s}"
        if opts.disk_write_mib_s:
            args += (
                f" ksa.hot={opts.disk_write_mib_s} ksa.hotdev={opts.disk_write_dev}"
                f" ksa.hotmib={opts.disk_write_region_mib} ksa.hotsecs={opts.disk_write_seconds}"
            )
        cmdline = f"console=ttyS0 edd=off quiet loglevel=1 {args}"
        xml = domain.domain_xml(
            name=guest.name,
            uuid=guest.uuid,
            memory_mib=opts.memory_mib,
            kernel=None if opts.bare else str(img.kernel),
            initrd=str(img.initrd),
            cmdline=cmdline,
            console=str(guest.console),
            disks=[_disk_def(d, lab) for d in guest.disks],
        )
        (guest.dir / "domain.xml").write_text(xml)
        virsh(host, "define", str(guest.dir / "domain.xml"))
        virsh(host, "start", guest.name)
        if opts.bare:
            return guest
        started = time.monotonic()
        _wait_acks(guest, {d: 1 for d in devs}, opts.boot_timeout)
        log(f"{guest.name}: writing on {len(devs)} disks {time.monotonic() - started:.1f} s after start")
        for layer in range(1, opts.snapshots + 1):
            _take_snapshot(guest, opts, host, layer, plan)
        return guest
    except BaseException:
        log(f"{guest.name}: creation failed; console tail:\n{_console_tail(guest.console)}")
        if not opts.keep_on_failure:
            destroy(guest.name, quiet=True)
        raise


def _disk_def(disk: GuestDisk, lab: LabState | None) -> DiskDef:
    serial = uuid.UUID(disk.volume_uuid).hex
    if not disk.layers[0].startswith("rbd:"):
        return DiskDef(disk.dev, disk.layers[0], serial)
    assert lab is not None
    access = (CEPH_ADDRESS, CEPH_MON_PORTS[1], CEPH_USER, lab.ceph.secret_uuid)
    return DiskDef(disk.dev, disk.layers[0].removeprefix("rbd:"), serial, fmt="raw", rbd=access)


def _take_snapshot(
    guest: GuestRecord, opts: GuestOptions, host: Any, layer: int, plan: dict[str, list[str]]
) -> None:
    """Let the guest write into the current top for a while, then put a pre-filled overlay on every disk
    at once (live, external, disk-only, no libvirt metadata: as a cloud's volume snapshot looks)."""
    before = read_acks(guest.name)
    want = {d.dev: (before[d.dev].count if d.dev in before else 0) + 20 for d in guest.disks}
    time.sleep(2)
    _wait_acks(guest, want, 120)
    specs = []
    for disk in guest.disks:
        path = Path(disk.layers[-1]).parent / f"{plan[disk.dev][layer]}.qcow2"
        _make_layer(disk, opts, layer, path, Path(disk.layers[-1]))
        specs += ["--diskspec", f"{disk.dev},snapshot=external,file={path}"]
    guest.save()
    virsh(
        host,
        "snapshot-create-as",
        guest.name,
        "--disk-only",
        "--atomic",
        "--no-metadata",
        "--reuse-external",
        *specs,
    )
    below = {dev: a.count for dev, a in read_acks(guest.name).items()}
    log(f"{guest.name}: layer {layer} added; acknowledged records below it: {below}")


def _wait_acks(guest: GuestRecord, want: dict[str, int], timeout: float) -> None:
    def enough() -> bool:
        acks = read_acks(guest.name)
        return all(dev in acks and acks[dev].count >= n for dev, n in want.items())

    wait_for(f"{guest.name} to acknowledge writes {want}", enough, timeout=timeout, interval=0.3)


def _console_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console)"
