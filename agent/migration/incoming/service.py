"""The destination side of a cross-host (or offline) move: prepare targets, fill layers, then commit or abort.

The source agent drives it over the authenticated agent API:
- ``prepare``: confine every destination path in the named storage root, check free space, create the
  target images (empty tops whose backing points at the destination's copy of the layer below, or flat
  images when flattening) and record every created file before creating it; a disk marked ``precreated``
  has its target made by the management plane: it is checked (``agent.migration.targets``), never
  created, recorded or removed;
- layer transfers fill the lower layers (``agent.transfer``);
- ``commit``: the VM runs here from the new paths; forget the record (files now belong to the VM);
- ``define`` (offline move): define the VM here from the transferred images, then forget the record;
- ``abort``: remove every file this migration created; idempotent, also after an agent restart.

Every record is bound to the peer that prepared it (``peer``, the caller's name from ``agent.api.access``):
only that peer may open layers, define, commit, abort or look at it (403 ``AGENT.NOT_YOUR_MIGRATION``).
What a peer asks is checked against what was prepared: a pre-created disk carries no layers; a layer's path
is new (never an existing file) and never a disk's top (but for an offline move's last layer, which is its
own disk's top); ``define`` takes only the domain the source declared at prepare (``domain``).

Limits (``IncomingLimits``): open migrations and open layer exports per host (429 ``AGENT.BUSY`` with
``Retry-After`` when full); the space a prepare needs is reserved until its migration settles, so that
concurrent prepares cannot all pass one free-space check.

Records (``records``) outlive the agent; ``reconcile`` settles them at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import StorageKind
from agent.errors import (
    Busy,
    Code,
    Conflict,
    InvalidRequest,
    MigrationFailed,
    NotFound,
    PreflightFailed,
    StorageKindUnsupported,
)
from agent.migration.devices import check_device_takes, free_devices, used_here
from agent.migration.incoming.domain import check_definition, domain_parts, domain_uuid
from agent.migration.incoming.reconcile import RECONCILE_EVERY_S, RECONCILE_GIVE_UP_S, reconcile
from agent.migration.incoming.records import (
    IncomingRecord,
    IncomingRecords,
    IncomingState,
    Layout,
    Reservation,
    remove_created,
)
from agent.migration.peer.wire import IncomingDisk, IncomingLayer, IncomingSpec, PreparedDisk, PreparedRbd
from agent.migration.request import normalise_uuid
from agent.migration.targets import check_precreated_target
from agent.storage import qemuimg, rbdimages
from agent.storage.blockdir import BlockDir
from agent.storage.locations import parse_rbd
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoot, StorageRoots
from agent.storage.space import check_free_space
from agent.transfer.export import IncomingLayer as LayerExport
from agent.transfer.verify import LayerDigest, verify_layer
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost
from agent.virt.states import DomainState

log = logging.getLogger(__name__)

#: Seconds an abort waits for the paused incoming domain of a failed migration to disappear.
INCOMING_GONE_S = 20
#: Seconds a peer refused for a full limit is asked to wait (``Retry-After``).
RETRY_AFTER_S = 10


@dataclass(frozen=True)
class IncomingLimits:
    """Per host: migrations prepared and not settled, and layer exports open (each one a
    qemu-storage-daemon and a port)."""

    migrations: int = 2
    exports: int = 2


class IncomingService:
    """Prepared incoming migrations on this host, by id (the source task uuid)."""

    def __init__(
        self,
        roots: StorageRoots,
        host: VirtHost | None,
        state_dir: Path,
        *,
        peer_libvirt_uri: str,
        migration_address: str,
        limits: IncomingLimits = IncomingLimits(),
    ) -> None:
        self.roots = roots
        self.limits = limits
        self.host = host
        self.records = IncomingRecords(state_dir)
        self.peer_libvirt_uri = peer_libvirt_uri
        self.migration_address = migration_address
        self._lock = asyncio.Lock()
        self._layers: dict[tuple[str, str], LayerExport] = {}  # (migration id, path) -> open export

    def list_ids(self) -> list[str]:
        return self.records.list_ids()

    async def prepare(self, spec: IncomingSpec, peer: str) -> dict[str, Any]:
        """Create the destination images for ``peer``; answers with their paths and where to migrate to."""
        async with self._lock:
            parts = None if spec.domain is None else self._declared(spec)
            wire = spec.model_copy(update={"domain": None})
            if self.records.exists(spec.migrationId):
                existing = self.records.load_owned(spec.migrationId, peer)
                if existing.spec != wire or existing.domainParts != parts:
                    raise Conflict(f"incoming migration {spec.migrationId} exists with another spec")
                return self._answer(existing)
            open_ids = self.records.list_ids()
            if len(open_ids) >= self.limits.migrations:
                raise Busy(
                    f"this host has {len(open_ids)} incoming migrations open; the limit is "
                    f"{self.limits.migrations}",
                    retry_after_s=RETRY_AFTER_S,
                    details="limits.incoming_migrations in agent.toml",
                )
            root = self.roots.storage(spec.dstPrimaryStorageUuid, field="dstPrimaryStorageUuid")
            if isinstance(root, StorageRoot):
                layout = self._layout(spec, root)
                needed = await self._preflight(spec, root, layout)
            else:
                layout = await self._volume_layout(spec, root)
                needed = 0  # Ceph keeps its own books; a device is the disk's whole room
            record = IncomingRecord(
                migrationId=spec.migrationId,
                vmUuid=spec.vmUuid,
                peer=peer,
                spec=wire,
                domainParts=parts,
                layout=layout,
                reserved=Reservation(storage=root.uuid, bytes=needed),
            )
            self.records.save(record)
            try:
                for disk, paths in zip(spec.disks, layout.disks, strict=True):
                    await self._create_disk(record, disk, paths)
            except BaseException:
                await remove_created(record, self.roots, self.host)
                raise
            record.state = IncomingState.PREPARED
            self.records.save(record)
            log.info(
                "incoming migration %s for VM %s prepared in storage %s for %s",
                spec.migrationId,
                spec.vmUuid,
                root.uuid,
                peer,
            )
            return self._answer(record)

    @staticmethod
    def _declared(spec: IncomingSpec) -> dict[str, str]:
        """The declared domain's parts; it must be the migration's VM."""
        assert spec.domain is not None
        uuid = domain_uuid(spec.domain)
        if uuid is None or normalise_uuid(uuid) != spec.vmUuid:
            raise InvalidRequest(
                f"the declared domain's uuid {uuid} is not the migration's VM {spec.vmUuid}",
                code=Code.DOMAIN_MISMATCH,
                field="domain",
            )
        return domain_parts(spec.domain)

    def _layout(self, spec: IncomingSpec, root: StorageRoot) -> Layout:
        """Every disk's top and lower layers, confined in ``root``. A pre-created disk carries no layers
        (a real source plans lower layers only for targets it makes); no path is written twice; a layer is
        never a top (but an offline move's last layer is its own disk's top: it travels like the others)."""
        disks: list[PreparedDisk] = []
        for i, disk in enumerate(spec.disks):
            if disk.precreated and disk.layers:
                raise InvalidRequest(
                    "a pre-created disk carries no layers: its chain is the management plane's",
                    field=f"disks[{i}].layers",
                )
            top = str(root.confine(disk.top, f"disks[{i}].top"))
            top_dir = os.path.dirname(top)
            layers = [
                str(
                    root.confine(
                        os.path.join(top_dir, os.path.basename(layer.name)), f"disks[{i}].layers[{j}].name"
                    )
                )
                for j, layer in enumerate(disk.layers)
            ]
            disks.append(PreparedDisk(target=disk.target, top=top, layers=tuple(layers)))
        tops = {d.top for d in disks}
        seen: set[str] = set()
        for i, (disk, paths) in enumerate(zip(spec.disks, disks, strict=True)):
            own_top = [paths.top] if disk.offline and paths.layers[-1:] == (paths.top,) else []
            for j, path in enumerate(paths.layers):
                if path in tops and not (own_top and j == len(paths.layers) - 1):
                    raise InvalidRequest(
                        f"layer {path} would overwrite a disk's top", field=f"disks[{i}].layers[{j}].name"
                    )
            for written in [paths.top, *(p for p in paths.layers if p not in own_top)]:
                if written in seen:
                    raise PreflightFailed(f"two images would be written to {written}", field=f"disks[{i}]")
                seen.add(written)
        return Layout(disks=disks)

    async def _volume_layout(self, spec: IncomingSpec, storage: RbdPool | BlockDir) -> Layout:
        """Every disk's volume in an RBD pool or a directory of block devices, checked before anything is
        made: one raw volume per disk (the source flattens, a running VM only: the migration's mirror is
        what writes it). RBD: this host's secret opens the pool (``AGENT.CEPH_ACCESS`` naming it), the
        image is new (or the caller's, of the disk's size). Block: the device asked for, else the smallest
        free one that holds the disk, blank and held by no one, and in no other open migration."""
        if self.host is None:
            raise MigrationFailed("no libvirt connection on the destination agent")
        for i, disk in enumerate(spec.disks):
            if disk.offline or disk.layers or disk.format != "raw" or not disk.flatten:
                raise StorageKindUnsupported(
                    f"disk {disk.target}: storage {storage.uuid} is of kind {storage.kind}, which takes one "
                    "raw volume per disk written by a live migration",
                    field=f"disks[{i}]",
                    details="a stopped VM, or a chain kept layer by layer, moves onto file storage only "
                    "across hosts (docs/storage.md)",
                )
            if disk.precreated and isinstance(storage, BlockDir):
                raise InvalidRequest(
                    "targetsPrecreated onto block storage is not done: the agent picks and claims the device",
                    field=f"disks[{i}].precreated",
                )
        if isinstance(storage, RbdPool):
            return await self._rbd_layout(spec, storage)
        return await self._block_layout(spec, storage)

    async def _rbd_layout(self, spec: IncomingSpec, pool: RbdPool) -> Layout:
        assert self.host is not None
        room = await rbdimages.check_access(self.host, pool)
        wire = PreparedRbd(monitors=pool.monitors, user=pool.user, secretUuid=pool.secret_uuid)
        used = await used_here(self.host)
        disks: list[PreparedDisk] = []
        for i, disk in enumerate(spec.disks):
            image = pool.confine(disk.top, f"disks[{i}].top")
            if str(image) in used:  # a peer never gets another VM's image of this host, pre-created or not
                raise PreflightFailed(
                    f"target {image} is used by a domain of this host",
                    code=Code.TARGET_EXISTS,
                    field=f"disks[{i}].top",
                )
            found = await rbdimages.image_size(self.host, pool, image)
            if disk.precreated and found != disk.virtualSize:
                what = "does not exist" if found is None else f"is {found} bytes, the disk {disk.virtualSize}"
                raise PreflightFailed(
                    f"the pre-created target {image} {what}",
                    code=Code.TARGET_MISMATCH,
                    field=f"disks[{i}].top",
                )
            if not disk.precreated and found is not None:
                raise PreflightFailed(
                    f"target {image} already exists on this host's pool",
                    code=Code.TARGET_EXISTS,
                    field="disks",
                    details="remove the image or choose another dstInstallPath",
                )
            disks.append(PreparedDisk(target=disk.target, top=str(image), kind=StorageKind.RBD, rbd=wire))
        if len({d.top for d in disks}) < len(disks):
            raise PreflightFailed("two disks would be written to one image", field="disks")
        needed = sum(d.estimatedBytes for d in spec.disks if not d.precreated)
        if room.known and room.available < needed:
            raise PreflightFailed(
                f"pool {pool.pool} has {room.available} bytes available, the move needs {needed}",
                code=Code.NO_SPACE,
                field="dstPrimaryStorageUuid",
            )
        return Layout(disks=disks)

    async def _block_layout(self, spec: IncomingSpec, storage: BlockDir) -> Layout:
        assert self.host is not None
        used = await used_here(self.host)
        for migration_id in self.records.list_ids():  # chosen by an open migration, not written yet
            with contextlib.suppress(NotFound, ValueError):
                used.update(self.records.load(migration_id).layout.tops().values())
        free = [f for f in await free_devices(self.host, storage) if f[0] not in used]
        disks: list[PreparedDisk] = []
        for i, disk in enumerate(spec.disks):
            field = f"disks[{i}].top"
            if "/" in disk.top or os.path.lexists(storage.path / disk.top):  # the caller's dstInstallPath
                device = str(storage.confine(disk.top, field))
            else:
                fitting = sorted((f for f in free if f[1] >= disk.virtualSize), key=lambda f: (f[1], f[0]))
                if not fitting:
                    raise PreflightFailed(
                        f"no free block device of at least {disk.virtualSize} bytes for disk {disk.target} "
                        f"in storage {storage.uuid} ({storage.path}) on this host",
                        code=Code.NO_SPACE,
                        field="dstPrimaryStorageUuid",
                        details="free now: " + (", ".join(f"{p} ({n} bytes)" for p, n in free) or "none"),
                    )
                device = fitting[0][0]
            free = [f for f in free if f[0] != device]
            await check_device_takes(storage, device, disk.target, disk.virtualSize, used, field=field)
            used.add(device)
            disks.append(
                PreparedDisk(target=disk.target, top=device, kind=StorageKind.BLOCK, size=disk.virtualSize)
            )
        return Layout(disks=disks)

    def _reserved(self, storage_uuid: str) -> int:
        """Bytes the open migrations of this host reserved in ``storage_uuid``."""
        total = 0
        for migration_id in self.records.list_ids():
            with contextlib.suppress(NotFound, ValueError):  # gone meanwhile, or unreadable
                reserved = self.records.load(migration_id).reserved
                if reserved is not None and reserved.storage == storage_uuid:
                    total += reserved.bytes
        return total

    async def _preflight(self, spec: IncomingSpec, root: StorageRoot, layout: Layout) -> int:
        """Check the targets and the space; returns the bytes the migration reserves."""
        needed = 0
        for i, (disk, paths) in enumerate(zip(spec.disks, layout.disks, strict=True)):
            if disk.precreated:
                await check_precreated_target(
                    paths.top,
                    fmt=disk.format,
                    virtual_size=disk.virtualSize,
                    flatten=disk.flatten,
                    field=f"disks[{i}].top",
                )
            for path in [*([] if disk.precreated else [paths.top]), *paths.layers]:
                if os.path.lexists(path):
                    raise PreflightFailed(
                        f"target {path} already exists on this host",
                        code=Code.TARGET_EXISTS,
                        field="disks",
                        details="remove it or choose another destination",
                    )
            needed += disk.estimatedBytes + sum(layer.actualSize for layer in disk.layers)
        await check_free_space(
            root,
            needed,
            field="dstPrimaryStorageUuid",
            where=" on this host",
            reserved=self._reserved(root.uuid),
        )
        return needed

    async def _create_disk(self, record: IncomingRecord, disk: IncomingDisk, paths: PreparedDisk) -> None:
        """Create the top now; lower layers are created by their transfer (``open_layer``), base first. An
        RBD image is made thin; a block device is only recorded (the migration's full mirror writes it
        whole; an abort gives it back blank)."""
        if disk.precreated or disk.offline:
            return
        if paths.kind is not StorageKind.FILE:
            record.created.append(paths.top)
            self.records.save(record)
            if paths.kind is StorageKind.RBD:
                pool = self.roots.storage(record.spec.dstPrimaryStorageUuid)
                assert isinstance(pool, RbdPool) and self.host is not None
                await rbdimages.create_image(self.host, pool, parse_rbd(paths.top, "top"), disk.virtualSize)
            return
        below = paths.layers[-1] if paths.layers else None
        below_fmt = disk.layers[-1].format if disk.layers else None
        record.created.append(paths.top)
        self.records.save(record)
        await qemuimg.create(
            paths.top,
            disk.format,
            disk.virtualSize,
            backing=None if disk.flatten else below,
            backing_format=None if disk.flatten else below_fmt,
            backing_may_be_missing=True,
        )

    async def open_layer(self, migration_id: str, peer: str, target: str, index: int) -> dict[str, Any]:
        """Create lower layer ``index`` of ``target`` and export it over NBD (TLS-PSK) for the source to
        fill; answers the endpoint, which only the authenticated source agent learns."""
        async with self._lock:
            record = self.records.load_owned(migration_id, peer)
            path, spec, backing, backing_fmt = self._layer(record, target, index)
            key = (normalise_uuid(migration_id), path)
            if key in self._layers:
                return {"path": path, "endpoint": self._layers[key].endpoint.to_dict()}
            if path in record.layersDone:
                raise Conflict(f"layer {path} was already transferred and verified")
            if len(self._layers) >= self.limits.exports:
                raise Busy(
                    f"this host has {len(self._layers)} layer exports open; the limit is "
                    f"{self.limits.exports}",
                    retry_after_s=RETRY_AFTER_S,
                    details="limits.incoming_exports in agent.toml",
                )
            if path in record.created:
                if os.path.lexists(path):  # our partial copy from before a restart: start it over
                    os.unlink(path)
            elif os.path.lexists(path):  # never this migration's: someone else's file
                raise PreflightFailed(
                    f"layer {path} already exists on this host; it is not this migration's",
                    code=Code.TARGET_EXISTS,
                    field="index",
                )
            else:
                record.created.append(path)
                self.records.save(record)
            layer = await LayerExport.prepare(
                path,
                spec.format,
                spec.virtualSize,
                listen_host=self.migration_address,
                backing=backing,
                backing_format=backing_fmt,
                cluster_size=spec.clusterSize,
            )
            self._layers[key] = layer
            log.info(
                "incoming migration %s: layer %s exported on %s", migration_id, path, self.migration_address
            )
            return {"path": path, "endpoint": layer.endpoint.to_dict()}

    async def finish_layer(
        self, migration_id: str, peer: str, target: str, index: int, digest: dict[str, Any]
    ) -> dict[str, Any]:
        """The source finished sending: close the export, then check the layer against the source's digest
        and its backing pointer. A layer that does not match is removed."""
        async with self._lock:
            record = self.records.load_owned(migration_id, peer)
            path, spec, backing, backing_fmt = self._layer(record, target, index)
            layer = self._layers.pop((normalise_uuid(migration_id), path), None)
            if layer is None:
                if path in record.layersDone:
                    return {"path": path, "verified": True}
                raise NotFound(f"layer {path} is not being transferred", field="index")
            await layer.finish()
            try:
                await verify_layer(
                    path,
                    spec.format,
                    LayerDigest.from_dict(digest),
                    backing=backing,
                    backing_format=backing_fmt,
                )
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                raise
            record.layersDone.append(path)
            self.records.save(record)
            log.info("incoming migration %s: layer %s verified", migration_id, path)
            return {"path": path, "verified": True}

    def _layer(
        self, record: IncomingRecord, target: str, index: int
    ) -> tuple[str, IncomingLayer, str | None, str | None]:
        """(path, spec, backing path, backing format) of lower layer ``index`` (base = 0) of ``target``."""
        for disk, spec in zip(record.layout.disks, record.spec.disks, strict=True):
            if disk.target != target:
                continue
            if not 0 <= index < len(disk.layers):
                raise NotFound(f"disk {target} has no layer {index}", field="index")
            backing = disk.layers[index - 1] if index > 0 else None
            backing_fmt = spec.layers[index - 1].format if index > 0 else None
            return disk.layers[index], spec.layers[index], backing, backing_fmt
        raise NotFound(f"incoming migration {record.migrationId} has no disk {target}", field="target")

    def _answer(self, record: IncomingRecord) -> dict[str, Any]:
        return {
            "migrationId": record.migrationId,
            "state": record.state,
            "disks": [d.model_dump(mode="json") for d in record.layout.disks],
            "libvirtUri": self.peer_libvirt_uri,
            "migrationUri": f"tcp://{self.migration_address}",
            "migrationAddress": self.migration_address,
        }

    async def get(self, migration_id: str, peer: str) -> dict[str, Any]:
        return self._answer(self.records.load_owned(migration_id, peer))

    def vm_of(self, migration_id: str, peer: str) -> str:
        """The VM of ``peer``'s migration, open or settled (where it runs is then asked of libvirt)."""
        return self.records.vm_of(migration_id, peer)

    async def commit(self, migration_id: str, peer: str) -> dict[str, Any]:
        """The VM arrived: check it runs here from the new paths, then forget the record."""
        async with self._lock:
            record = self.records.load_owned(migration_id, peer)
            if self.host is None:
                raise MigrationFailed("no libvirt connection on the destination agent")
            live = {d.target: d for d in parse_disks(await self.host.live_xml(record.vmUuid))}
            for disk in record.layout.disks:
                got = live.get(disk.target)
                if got is None or got.location != disk.top:
                    raise MigrationFailed(
                        f"VM {record.vmUuid} does not use {disk.top} for {disk.target} here",
                        code=Code.VERIFY_FAILED,
                    )
            persistent = await self.host.is_persistent(record.vmUuid)
            self.records.settle(record, IncomingState.COMMITTED)
            log.info("incoming migration %s committed: VM %s runs here", migration_id, record.vmUuid)
            return {"migrationId": migration_id, "state": IncomingState.COMMITTED, "persistent": persistent}

    async def define(self, migration_id: str, peer: str, xml: str) -> dict[str, Any]:
        """Offline move: define the VM here from the transferred images, then forget the record. Only the
        domain declared at prepare, on this migration's images (``domain.check_definition``)."""
        async with self._lock:
            record = self.records.load_owned(migration_id, peer)
            wanted = record.layout.tops()
            check_definition(
                xml, declared=record.domainParts, vm_uuid=record.vmUuid, tops=set(wanted.values())
            )
            if self.host is None:
                raise MigrationFailed("no libvirt connection on the destination agent")
            given = {d.target: d.source for d in parse_disks(xml)}
            for target, top in wanted.items():
                if given.get(target) != top:
                    raise InvalidRequest(
                        f"the definition points {target} at {given.get(target)}, not {top}", field="xml"
                    )
            missing = [p for p in record.created if not os.path.exists(p)]
            if missing or len(record.layersDone) < len(record.created):
                raise Conflict(
                    "not every image has arrived and been verified", details=", ".join(missing) or None
                )
            await self.host.define_xml(xml)
            self.records.settle(record, IncomingState.DEFINED)
            log.info("incoming migration %s: VM %s defined here", migration_id, record.vmUuid)
            return {"migrationId": migration_id, "state": IncomingState.DEFINED}

    async def abort(self, migration_id: str, peer: str) -> dict[str, Any]:
        """Remove what the migration created; unknown ids are fine (idempotent)."""
        async with self._lock:
            try:
                record = self.records.load_owned(migration_id, peer)
            except NotFound:
                return {"migrationId": migration_id, "state": IncomingState.ABORTED, "removed": []}
            if self.host is not None and await self._vm_runs_here(record.vmUuid):
                raise Conflict(
                    f"VM {record.vmUuid} already runs on this host; refusing to remove its files",
                    details="the migration finished; commit it instead",
                )
            for key in [k for k in self._layers if k[0] == normalise_uuid(migration_id)]:
                await self._layers.pop(key).abort()
            removed = await remove_created(record, self.roots, self.host)
            self.records.forget(migration_id)
            log.info("incoming migration %s aborted; removed %d files", migration_id, len(removed))
            return {"migrationId": migration_id, "state": IncomingState.ABORTED, "removed": removed}

    async def reconcile(
        self, *, every_s: float = RECONCILE_EVERY_S, give_up_s: float = RECONCILE_GIVE_UP_S
    ) -> None:
        """At start: settle every record an earlier life of this agent left (``reconcile``)."""
        assert self.host is not None
        await reconcile(self.records, self.roots, self.host, self._lock, every_s=every_s, give_up_s=give_up_s)

    async def _vm_runs_here(self, vm_uuid: str) -> bool:
        """True when the VM runs here. A *paused* domain is what an incoming migration looks like until it
        switches over, and libvirt removes it shortly after a failed one (after a source libvirtd restart
        only once its recovery ran): give it a while to go before refusing."""
        assert self.host is not None
        for _ in range(INCOMING_GONE_S):
            try:
                state = await self.host.domain_state(vm_uuid)
            except NotFound:
                return False
            if state != DomainState.PAUSED:
                return state == DomainState.RUNNING
            await asyncio.sleep(1)
        return True
