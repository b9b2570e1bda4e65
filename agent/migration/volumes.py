"""Volumes by kind, for the engines: the libvirt source of a planned volume (a file, a block device, an RBD
image with its pool's access), and removing what a task created, each kind its own way.

A task journals every volume it is about to create or write by its location (``Work.created``); undoing is:
a file is removed; a block device the task chose is given back blank (``blockdir.release``); an RBD image
the task created is removed. A location no configured storage holds is never touched.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from agent.config import StorageKind
from agent.errors import AgentError, Code, InvalidRequest, MigrationFailed, PreflightFailed
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.plan import DiskPlan, allocation_index
from agent.storage import blockdir, qemuimg, rbdimages
from agent.storage.blockdir import BlockDir
from agent.storage.locations import parse_rbd
from agent.storage.rbdkey import keyed
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import Storage, StorageRoot, StorageRoots
from agent.virt import livemap
from agent.virt.domxml import DiskXml, RbdAccess, VolumeSource
from agent.virt.host import VirtHost


def kind_of_disk(disk: DiskXml) -> StorageKind | None:
    """The kind of a domain disk's volume; None for a network disk that is not RBD, or no source."""
    if disk.location is None:
        return None
    if disk.type == "file":
        return StorageKind.FILE
    if disk.type == "block":
        return StorageKind.BLOCK
    if disk.type == "network" and disk.location.startswith("rbd:"):
        return StorageKind.RBD
    return None


#: Block devices a same-host task of this agent has chosen, from its planning until it ends: a blank device
#: looks free to every planner until a mirror writes it, so two tasks planning at once could take one device.
#: A device being mirrored into is also in its domain's live XML (``VirtHost.used_locations``), which is
#: what covers a task resumed after a restart.
CLAIMED_DEVICES: set[str] = set()


def claim_devices(devices: list[str]) -> None:
    """Claim every device of a plan, or none: a device another task of this agent holds is refused."""
    held = [d for d in devices if d in CLAIMED_DEVICES]
    if held:
        raise PreflightFailed(
            f"block device {held[0]} is being taken by another move on this host",
            code=Code.TARGET_EXISTS,
            field="volumes",
            details="wait for that move to end, or choose another device",
        )
    CLAIMED_DEVICES.update(devices)


def rbd_access(pool: RbdPool) -> RbdAccess:
    return RbdAccess(pool.monitors, pool.user, pool.secret_uuid)


def volume_source(storage: Storage | None, kind: StorageKind, location: str, fmt: str) -> VolumeSource:
    """How libvirt names the volume at ``location`` of ``kind``; an RBD image takes its access (monitors,
    user, secret) from ``storage``, the RBD pool that holds it."""
    if kind is StorageKind.RBD:
        if not isinstance(storage, RbdPool):
            raise InvalidRequest(f"{location}: no RBD storage of this host holds it")
        image = parse_rbd(location, "location")
        return VolumeSource(kind, str(image), fmt, rbd_access(storage))
    return VolumeSource(kind, location, fmt)


def snapshots_refused(storage: Storage) -> str | None:
    """None when a chain moved onto ``storage`` can keep its lower layers as RBD snapshots (an RBD pool whose
    storage names a keyring: the agent writes and snapshots them itself), else why not (for the plan's
    notes); not an RBD pool: None, nothing to refuse."""
    if isinstance(storage, RbdPool) and storage.keyring is None:
        return f"keeping them as RBD snapshots needs a keyring in storage {storage.uuid} (agent.toml)"
    return None


async def source_index(host: VirtHost, vm_uuid: str, disk: DiskPlan) -> AllocationIndex:
    """Where ``disk``'s source data is: from qemu-img, or for an RBD image from the QEMU that has it open
    (``agent.virt.livemap``: the agent holds no Ceph key)."""
    return await allocation_index(disk, lambda: livemap.live_allocation(host, vm_uuid, disk.target))


async def create_top(host: VirtHost, dst: Storage, disk: DiskPlan) -> None:
    """Make the destination top a mirror writes into (journalled by the caller first): a qcow2 or raw file
    over its planned backing; a new thin RBD image of the disk's size; nothing on a block device (picked
    or checked blank and large enough in PREPARING: the mirror writes it raw)."""
    if disk.dst_kind is StorageKind.FILE:
        await qemuimg.create(
            disk.dst_top,
            disk.dst_format,
            disk.virtual_size,
            backing=disk.dst_backing,
            backing_format=disk.dst_backing_format,
        )
    elif disk.dst_kind is StorageKind.RBD:
        if not isinstance(dst, RbdPool) or not dst.contains(disk.dst_top):
            raise MigrationFailed(f"refusing to create {disk.dst_top}: not an image of storage {dst.uuid}")
        await rbdimages.create_image(host, dst, parse_rbd(disk.dst_top, "volumes"), disk.virtual_size)


async def start_over(host: VirtHost, dst: Storage, disk: DiskPlan) -> None:
    """An aborted mirror's target made new for the next mirror (a file or an image made again; a block
    device is rewritten whole by the next full mirror)."""
    if disk.dst_kind is StorageKind.FILE:
        Path(disk.dst_top).unlink()
    elif disk.dst_kind is StorageKind.RBD and disk.lower_layers:
        # The image holds the layers below as snapshots: its head goes back to the newest of them.
        assert isinstance(dst, RbdPool)
        async with keyed(dst, "keeping a chain as RBD snapshots") as key:
            await key.rbd("snap", "rollback", disk.lower_layers[-1].dst.removeprefix("rbd:"))
        return
    elif disk.dst_kind is StorageKind.RBD:
        assert isinstance(dst, RbdPool)
        await rbdimages.remove_image(host, dst, parse_rbd(disk.dst_top, "volumes"))
    await create_top(host, dst, disk)


async def release_created(
    host: VirtHost, roots: StorageRoots, location: str, log: logging.LoggerAdapter[logging.Logger]
) -> None:
    """Undo the creation of one volume a task journalled: by the kind of the storage that holds it."""
    storage = roots.owner_of_location(location)
    if storage is None:
        log.error("not releasing %s: no storage of this host holds it", location)
        return
    try:
        if isinstance(storage, StorageRoot):
            Path(location).unlink(missing_ok=True)
        elif isinstance(storage, BlockDir):
            await asyncio.to_thread(blockdir.release, Path(location))
            log.info("block device %s given back blank", location)
        elif await rbdimages.remove_image(host, storage, parse_rbd(location, "location")):
            log.info("RBD image %s removed", location)
    except OSError as err:
        log.error("could not release %s: %s", location, err.strerror or err)
    except AgentError as err:
        log.error("could not release %s: %s", location, err.description)
