"""RBD images through the host's libvirt: the agent holds no Ceph key of its own.

The cephx key of an RBD storage is the value of a private libvirt secret (``secret_uuid``), which libvirt
never hands out; QEMU gets it from libvirt. So the agent reaches the pool the same way: through a transient
libvirt storage pool of type ``rbd`` per storage (``ksa-rbd-<storage uuid>``) whose ``<auth>`` names that
secret. Creating an image, removing it, listing and the pool's room go through it, and opening it is the
proof that this host's secret opens the pool (``check_access``, the destination's preflight).

libvirt's rbd backend connects to the cluster on each call (the secret is read again each time), so a
secret removed after the pool was made is seen by the next call. A pool is refreshed before an image is
looked up: libvirt answers lookups from the list its last refresh made. Calls on one pool are serialised
here (a refresh fails while a volume is being created in the same pool).

Not done: RBD namespaces (libvirt 9.0's rbd pool has no namespace) are refused by ``pool_for``; the pool's
room is known only when the cluster reports it (Pacific without a ``ceph-mgr`` reports 0 bytes everywhere:
``Room.known`` is then False and the move says it did not check).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

from agent.errors import Code, PreflightFailed, StorageKindUnsupported
from agent.storage.locations import RbdImage
from agent.storage.rbdpool import RbdPool
from agent.virt.host import VirtHost

POOL_PREFIX = "ksa-rbd-"

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


@dataclass(frozen=True)
class Room:
    """The pool's sizes as the cluster reports them (bytes); ``known`` is False when it reports none."""

    capacity: int
    allocation: int
    available: int

    @property
    def known(self) -> bool:
        return self.capacity > 0


def pool_name(storage: RbdPool) -> str:
    return POOL_PREFIX + storage.uuid


def pool_xml(storage: RbdPool) -> str:
    hosts = "".join(f"<host name={quoteattr(h)} port='{p}'/>" for h, p in storage.monitors)
    return (
        f"<pool type='rbd'><name>{pool_name(storage)}</name><source><name>{storage.pool}</name>{hosts}"
        f"<auth type='ceph' username={quoteattr(storage.user)}>"
        f"<secret uuid={quoteattr(storage.secret_uuid)}/></auth></source></pool>"
    )


def volume_xml(name: str, size: int) -> str:
    return (
        f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
        "<target><format type='raw'/></target></volume>"
    )


def _refuse_namespace(storage: RbdPool) -> None:
    if storage.namespace:
        raise StorageKindUnsupported(
            f"storage {storage.uuid} is an RBD namespace ({storage.location}): this agent does not create or "
            "remove images in a namespace yet (libvirt 9.0's rbd storage pool has no namespace)",
            field="primaryStorageMigrateVm.dstPrimaryStorageUuid",
        )


def _message(err: libvirt.libvirtError) -> str:
    return str(err.get_error_message() or err)


def _secret_problem(conn: Any, storage: RbdPool) -> str | None:
    """What is wrong with the storage's libvirt secret on this host, or None."""
    try:
        secret = conn.secretLookupByUUIDString(storage.secret_uuid)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return (
                f"libvirt on this host has no secret {storage.secret_uuid} (the key of client.{storage.user} "
                f"for pool {storage.pool})"
            )
        raise
    if secret.usageType() != libvirt.VIR_SECRET_USAGE_TYPE_CEPH:
        return (
            f"the libvirt secret {storage.secret_uuid} on this host is not of usage 'ceph' "
            f"(usage type {secret.usageType()}, {secret.usageID()!r})"
        )
    return None


def _open_pool(conn: Any, storage: RbdPool) -> Any:
    """The storage's libvirt pool, made (transient) or started when needed, and refreshed: this connects to
    the cluster with the secret's key."""
    name = pool_name(storage)
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        return conn.storagePoolCreateXML(pool_xml(storage), 0)  # starting it connects and lists the images
    if not pool.isActive():
        pool.create(0)
    else:
        pool.refresh(0)
    return pool


def _access(conn: Any, storage: RbdPool) -> tuple[Any, Room]:
    problem = _secret_problem(conn, storage)
    if problem is not None:
        raise PreflightFailed(
            problem,
            code=Code.CEPH_ACCESS,
            field="primaryStorageMigrateVm.dstPrimaryStorageUuid",
            details=f"define the secret on this host with the same uuid, usage ceph and the key of "
            f"client.{storage.user} (virsh secret-define, secret-set-value)",
        )
    try:
        pool = _open_pool(conn, storage)
        _state, capacity, allocation, available = pool.info()
    except libvirt.libvirtError as err:
        raise PreflightFailed(
            f"the key in libvirt secret {storage.secret_uuid} does not open pool {storage.pool} as "
            f"client.{storage.user} through {', '.join(f'{h}:{p}' for h, p in storage.monitors)}: "
            f"{_message(err)}",
            code=Code.CEPH_ACCESS,
            field="primaryStorageMigrateVm.dstPrimaryStorageUuid",
            details="the secret's value must be the user's key, the user must have 'profile rbd' on the "
            "pool, and the monitors must be reachable from this host",
        ) from err
    return pool, Room(int(capacity), int(allocation), int(available))


async def check_access(host: VirtHost, storage: RbdPool) -> Room:
    """This host's libvirt has the storage's secret with usage ceph, and its key opens the pool: raises
    ``AGENT.CEPH_ACCESS`` saying which is wrong; returns the pool's room."""
    _refuse_namespace(storage)

    def _check(conn: Any) -> Room:
        with _lock(pool_name(storage)):
            return _access(conn, storage)[1]

    return await host.call(_check)


async def create_image(host: VirtHost, storage: RbdPool, image: RbdImage, size: int) -> None:
    """A new raw image of ``size`` bytes (thin: no object is written)."""
    _refuse_namespace(storage)

    def _create(conn: Any) -> None:
        with _lock(pool_name(storage)):
            pool, _room = _access(conn, storage)
            pool.createXML(volume_xml(image.name, size), 0)

    await host.call(_create)


async def image_exists(host: VirtHost, storage: RbdPool, image: RbdImage) -> bool:
    _refuse_namespace(storage)

    def _exists(conn: Any) -> bool:
        with _lock(pool_name(storage)):
            pool, _room = _access(conn, storage)
            return image.name in pool.listVolumes()

    return await host.call(_exists)


async def image_size(host: VirtHost, storage: RbdPool, image: RbdImage) -> int | None:
    """The image's size in bytes (libvirt's capacity of the volume), None when it is not there."""
    _refuse_namespace(storage)

    def _size(conn: Any) -> int | None:
        with _lock(pool_name(storage)):
            pool, _room = _access(conn, storage)
            if image.name not in pool.listVolumes():
                return None
            _type, capacity, _allocation = pool.storageVolLookupByName(image.name).info()
            return int(capacity)

    return await host.call(_size)


async def remove_image(host: VirtHost, storage: RbdPool, image: RbdImage) -> bool:
    """Remove the image and its snapshots; False when it was not there."""
    _refuse_namespace(storage)

    def _remove(conn: Any) -> bool:
        with _lock(pool_name(storage)):
            pool, _room = _access(conn, storage)
            if image.name not in pool.listVolumes():
                return False
            pool.storageVolLookupByName(image.name).delete(libvirt.VIR_STORAGE_VOL_DELETE_WITH_SNAPSHOTS)
            return True

    return await host.call(_remove)
