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
from agent.errors import InvalidRequest
from agent.storage import blockdir
from agent.storage.blockdir import BlockDir
from agent.storage.locations import parse_rbd
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import Storage, StorageRoot, StorageRoots
from agent.virt.domxml import DiskXml, RbdAccess, VolumeSource


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


async def release_created(
    roots: StorageRoots, location: str, log: logging.LoggerAdapter[logging.Logger]
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
        else:
            # RBD images a task creates are removed by the RBD moves (issue 25), which do not exist yet.
            log.error("not releasing %s: removing %s volumes is not done yet", location, storage.kind)
    except OSError as err:
        log.error("could not release %s: %s", location, err.strerror or err)
