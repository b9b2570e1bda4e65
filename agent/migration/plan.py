"""Planning a storage migration: which disks move, where each layer goes, how many bytes will move.

``plan_migration`` is pure (domain XML facts and chains in, a plan out) so the rules are unit tested without
libvirt; ``inspect_chains`` gathers the chains with qemu-img.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.config import StorageKind
from agent.errors import Code, InvalidRequest, PreflightFailed, StorageKindUnsupported
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.request import MigrationRequest
from agent.storage import qemuimg
from agent.storage.blockdir import BlockDir
from agent.storage.locations import is_rbd, parse_rbd
from agent.storage.qemuimg import Extent, ImageInfo
from agent.storage.rbdkey import snapshot_name
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import Storage, StorageRoot
from agent.virt.domxml import DiskXml, RbdAccess, VolumeSource

#: A free block device of a block storage: (its path, its size in bytes).
FreeDevice = tuple[str, int]


@dataclass(frozen=True)
class LayerPlan:
    """A read-only lower layer copied as a file, then pointed at its new backing file."""

    src: str
    dst: str
    format: str
    virtual_size: int
    actual_size: int
    backing_dst: str | None
    backing_format: str | None
    cluster_size: int | None = None  # qcow2: the destination copy gets the same, or verification fails


@dataclass(frozen=True)
class DiskPlan:
    target: str
    volume_uuid: str
    role: str  # Root or Data
    src_top: str
    src_format: str
    dst_top: str
    dst_format: str
    virtual_size: int
    flatten: bool
    lower_layers: tuple[LayerPlan, ...]  # base first; empty when flattening
    dst_backing: str | None  # the destination top's backing file (None when flattening)
    dst_backing_format: str | None
    src_chain: tuple[str, ...]  # top first
    estimated_bytes: int
    #: The caller created ``dst_top`` (``request.targetsPrecreated``): checked, never created or removed; when
    #: not flattening, its backing chain is the caller's and nothing is copied below the top.
    precreated: bool = False
    #: The kinds of the volumes at ``src_top`` and ``dst_top``: their locations are file paths, device paths
    #: (``block``) or ``rbd:pool/image`` (agent/storage/locations.py).
    src_kind: StorageKind = StorageKind.FILE
    dst_kind: StorageKind = StorageKind.FILE

    @property
    def shallow(self) -> bool:
        """Whether a shallow mirror (QEMU ``sync: top``) copies all this disk needs: the top onto a prepared
        chain, or a disk without a backing file onto a fresh file or RBD image, which reads as zeros where
        the source has nothing. A full copy walks the whole disk, and a qcow2 target it wrote carried zero
        clusters that the next move's mirror counted as data (docs/performance.md, case 2); only a
        flattened chain, a pre-created target or a block device (old bytes past its first MiB) needs it."""
        if not self.flatten:
            return True
        return len(self.src_chain) == 1 and not self.precreated and self.dst_kind is not StorageKind.BLOCK

    @property
    def src_image(self) -> str:
        """The source top as qemu-img opens it: a file by its path; a block device through its format,
        never probed from the guest's bytes, a raw one cut to the disk's size (the guest sees a slice of a
        larger device; read whole it would give an image of the device's size)."""
        if self.src_kind is not StorageKind.BLOCK:
            return self.src_top
        spec: dict[str, Any] = {
            "driver": self.src_format,
            "file": {"driver": "host_device", "filename": self.src_top},
        }
        if self.src_format == "raw":
            spec["size"] = self.virtual_size
        return "json:" + json.dumps(spec)

    def src_source(self, rbd: RbdAccess | None = None) -> VolumeSource:
        """The source top as libvirt names it (``rbd``: how to reach its pool, for an RBD image)."""
        size = self._slice(self.src_kind, self.src_format)
        return VolumeSource(self.src_kind, self.src_top, self.src_format, rbd, size)

    def dst_source(self, rbd: RbdAccess | None = None) -> VolumeSource:
        """The destination top as libvirt names it (``rbd``: how to reach its pool, for an RBD image)."""
        size = self._slice(self.dst_kind, self.dst_format)
        return VolumeSource(self.dst_kind, self.dst_top, self.dst_format, rbd, size)

    def _slice(self, kind: StorageKind, fmt: str) -> int | None:
        """A raw volume on a block device is the disk's size from the device's start (the device may be
        larger)."""
        return self.virtual_size if kind is StorageKind.BLOCK and fmt == "raw" else None


@dataclass(frozen=True)
class SkippedDisk:
    target: str
    source: str | None
    reason: str


@dataclass(frozen=True)
class MigrationPlan:
    vm_uuid: str
    dst_storage_uuid: str
    disks: tuple[DiskPlan, ...]
    skipped: tuple[SkippedDisk, ...]
    layers: tuple[LayerPlan, ...] = field(default=())  # unique lower layers across disks, copy order
    #: How QEMU reaches the destination pool, when it is an RBD storage.
    dst_rbd: RbdAccess | None = None
    #: What the plan decided that the request did not say (a chain flattened onto a kind that holds one
    #: layer), for the task's details.
    notes: tuple[str, ...] = ()

    def dst_source(self, disk: DiskPlan) -> VolumeSource:
        """Where ``disk`` goes, as libvirt names it (an RBD image with its pool's access)."""
        return disk.dst_source(self.dst_rbd)

    @property
    def dst_kind(self) -> StorageKind:
        """The destination storage's kind (every disk of a plan goes to one storage)."""
        return self.disks[0].dst_kind if self.disks else StorageKind.FILE

    @property
    def bytes_total(self) -> int:
        return sum(d.estimated_bytes for d in self.disks) + sum(layer.actual_size for layer in self.layers)

    @property
    def shallow_mirrors(self) -> bool:
        """Whether a shallow mirror (QEMU ``sync: top``) of every disk copies all it needs: the top layer onto
        a prepared chain, or the data of a disk without a backing file onto a fresh image. Only flattening a
        real chain, or a pre-created image that may hold old data, needs a full copy, which QEMU charges
        for the whole virtual size when the target is an NBD export (holes included; LAB-NOTES)."""
        return all(d.shallow for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MigrationPlan:
        disks = tuple(
            DiskPlan(
                **{
                    **d,
                    "lower_layers": tuple(LayerPlan(**lp) for lp in d["lower_layers"]),
                    "src_chain": tuple(d["src_chain"]),
                    # Journals written before kinds existed name files only.
                    "src_kind": StorageKind(d.get("src_kind", StorageKind.FILE)),
                    "dst_kind": StorageKind(d.get("dst_kind", StorageKind.FILE)),
                }
            )
            for d in data["disks"]
        )
        rbd = data.get("dst_rbd")
        return cls(
            vm_uuid=data["vm_uuid"],
            dst_storage_uuid=data["dst_storage_uuid"],
            disks=disks,
            skipped=tuple(SkippedDisk(**s) for s in data["skipped"]),
            layers=tuple(LayerPlan(**lp) for lp in data["layers"]),
            dst_rbd=(
                RbdAccess(tuple((h, int(p)) for h, p in rbd["monitors"]), rbd["user"], rbd["secret_uuid"])
                if rbd
                else None
            ),
            notes=tuple(data.get("notes", ())),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "disks": [
                {
                    "target": d.target,
                    "volumeUuid": d.volume_uuid,
                    "role": d.role,
                    "from": d.src_top,
                    "to": d.dst_top,
                    "fromKind": str(d.src_kind),
                    "toKind": str(d.dst_kind),
                    "flatten": d.flatten,
                    "layers": len(d.src_chain),
                }
                for d in self.disks
            ],
            "skipped": [{"target": s.target, "source": s.source, "reason": s.reason} for s in self.skipped],
            "bytesTotal": self.bytes_total,
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def root_disk(disks: Sequence[DiskXml]) -> DiskXml | None:
    """The boot disk, else the first plain disk."""
    plain = [d for d in disks if d.device == "disk"]
    booted = sorted((d for d in plain if d.boot_order), key=lambda d: d.boot_order or 0)
    if booted:
        return booted[0]
    return plain[0] if plain else None


def volume_uuid(disk: DiskXml, request: MigrationRequest) -> str:
    """The request's uuid for this disk, else its serial, else the image file's name without extension."""
    for mapping in request.volumes:
        if (
            mapping.installPath
            and disk.source
            and os.path.realpath(mapping.installPath) == os.path.realpath(disk.source)
            and mapping.uuid
        ):
            return mapping.uuid
    if disk.serial:
        return disk.serial
    return Path(disk.source or disk.target).name.split(".")[0]


#: The kinds of volume a same-host live move takes a disk from.
KINDS = (StorageKind.FILE, StorageKind.BLOCK, StorageKind.RBD)
#: A stopped VM's, on one host: the agent reads files, devices and RBD images itself (an image with its
#: pool's keyring, ``agent.storage.rbdkey``).
OFFLINE_KINDS = (StorageKind.FILE, StorageKind.BLOCK, StorageKind.RBD)
#: Files only (a stopped VM across hosts).
FILES_ONLY = (StorageKind.FILE,)


def _source_kind(disk: DiskXml) -> StorageKind | None:
    """The kind of volume ``disk`` reads (None: an empty drive, or a network disk other than RBD)."""
    if disk.type == "network":
        return StorageKind.RBD if disk.location and is_rbd(disk.location) else None
    if disk.source is None:
        return None
    return {"file": StorageKind.FILE, "block": StorageKind.BLOCK}.get(disk.type)


#: Why a data volume stays where it is.
DATA_VOLUME_LEFT = "data volume, and withDataVolumes is false"


_KIND_NAMES = {
    StorageKind.FILE: "file images",
    StorageKind.BLOCK: "block devices",
    StorageKind.RBD: "RBD images",
}


def _skip_reason(disk: DiskXml, is_root: bool, with_data: bool, kinds: Collection[StorageKind]) -> str | None:
    if disk.device != "disk":
        return f"{disk.device} devices stay where they are"
    if _source_kind(disk) not in kinds:
        return (
            f"{disk.type} disks are not "
            + ", ".join(_KIND_NAMES[k] for k in kinds)
            + " (what this move reads)"
        )
    if disk.readonly:
        return "read-only disks stay where they are"
    if disk.shareable:
        return "shareable disks are used by other VMs too"
    if not is_root and not with_data:
        return DATA_VOLUME_LEFT
    return None


def _names(install_path: str, disk: DiskXml) -> bool:
    """Whether the caller's ``installPath`` is ``disk``'s volume: the same file or device (symlinks
    resolved), or the same RBD image (``rbd:`` or ZStack's ``ceph://``)."""
    if disk.type == "network":
        if disk.location is None or not is_rbd(install_path):
            return False
        try:
            return parse_rbd(install_path, "installPath") == parse_rbd(disk.location, "source")
        except InvalidRequest:
            return False
    return disk.source is not None and os.path.realpath(install_path) == os.path.realpath(disk.source)


def _listed(disk: DiskXml, request: MigrationRequest) -> int | None:
    """Index of the ``volumes`` entry naming this disk (by install path, or uuid = serial), else None."""
    for i, mapping in enumerate(request.volumes):
        if mapping.installPath and _names(mapping.installPath, disk):
            return i
        if mapping.uuid and disk.serial and mapping.uuid == disk.serial:
            return i
    return None


def _asked_dst(disk: DiskXml, request: MigrationRequest) -> tuple[str, str] | None:
    """The request's ``dstInstallPath`` for this disk and its field, if it names one."""
    for i, mapping in enumerate(request.volumes):
        if not mapping.dstInstallPath:
            continue
        matches_path = mapping.installPath and _names(mapping.installPath, disk)
        matches_uuid = mapping.uuid and mapping.uuid in (disk.serial,)
        if matches_path or matches_uuid:
            return mapping.dstInstallPath, f"volumes[{i}].dstInstallPath"
    return None


def _dst_top_for(
    disk: DiskXml,
    index: int,
    request: MigrationRequest,
    dst: Storage | RemoteVolumes,
    *,
    volume: str,
    size: int,
    free: list[FreeDevice],
) -> str:
    """Where the disk's top goes in ``dst``: the request's ``dstInstallPath``, else the source file's or
    image's name (a file storage; a device's volume uuid), the volume's uuid (an RBD pool), or the smallest
    free device of at least ``size`` bytes (a block storage; taken out of ``free``)."""
    asked = _asked_dst(disk, request)
    if asked is not None:
        path, field_name = asked
        if isinstance(dst, BlockDir):
            free[:] = [f for f in free if f[0] != path]
        return str(dst.confine(path, field_name))
    if isinstance(dst, RemoteVolumes):
        return volume
    field_name = f"volumes[{index}]"
    if isinstance(dst, StorageRoot):
        # An RBD image's file takes the image's name; a device's, the volume's uuid (a device's name is
        # the storage's, not the volume's).
        named = volume if disk.type == "block" else disk.source or disk.location
        assert named is not None
        return str(dst.confine(Path(named).name, field_name))
    if isinstance(dst, RbdPool):
        return str(dst.confine(volume, field_name))
    fitting = sorted((f for f in free if f[1] >= size), key=lambda f: (f[1], f[0]))
    if not fitting:
        raise PreflightFailed(
            f"no free block device of at least {size} bytes for disk {disk.target} in storage {dst.uuid} "
            f"({dst.path})",
            code=Code.NO_SPACE,
            field="primaryStorageMigrateVm.dstPrimaryStorageUuid",
            details="a free device is blank (its first MiB zeros), used by no domain and held by no one; "
            f"free now: {', '.join(f'{p} ({n} bytes)' for p, n in free) or 'none'}",
        )
    chosen = fitting[0]
    free.remove(chosen)
    return chosen[0]


def plan_migration(
    vm_uuid: str,
    disks: Sequence[DiskXml],
    chains: Mapping[str, Sequence[ImageInfo]],
    request: MigrationRequest,
    dst_root: Storage | RemoteVolumes,
    *,
    dst_rbd: RbdAccess | None = None,
    free_devices: Sequence[FreeDevice] = (),
    kinds: Collection[StorageKind] = FILES_ONLY,
    rbd_snapshots: str | None = "keeping them as RBD snapshots is done on one host only",
) -> MigrationPlan:
    """Decide the moves. ``chains`` maps a disk target to its chain (top first) from qemu-img.

    With ``request.targetsPrecreated`` exactly the disks listed in ``volumes`` move (the root too only when
    listed), each onto its ``dstInstallPath``, and no lower layer is planned: the caller's target either is
    flat (filled completely) or already has its backing chain.

    Onto an RBD pool or a block storage each disk becomes one raw volume (``dst_rbd``: how QEMU reaches the
    pool; ``free_devices``: the block storage's devices a disk may take): a chain is flattened into it, and
    the plan says so when ``withSnapshots`` asked to keep it. ``kinds``: the kinds of source volume the
    move reads (``KINDS`` for a same-host live move, ``OFFLINE_KINDS`` for a stopped VM on one host); a root
    disk of another kind is refused (``AGENT.STORAGE_KIND_UNSUPPORTED``), a data volume stays.
    ``rbd_snapshots``: None when a chain kept onto an RBD pool (``withSnapshots``) can keep its lower layers
    as snapshots of the image (the engine writes them, with the pool's keyring), else why not (the chain
    is then flattened, and the plan's notes say why).
    """
    psm = request.primaryStorageMigrateVm
    precreated = request.targetsPrecreated
    dst_kind = dst_root.kind
    one_layer = dst_kind is not StorageKind.FILE
    if dst_kind is StorageKind.BLOCK and precreated:
        raise InvalidRequest(
            "targetsPrecreated onto block storage is not done: the agent picks and claims the device",
            field="targetsPrecreated",
        )
    free = list(free_devices)
    notes: list[str] = []
    root = root_disk(disks)
    if root is None:
        raise InvalidRequest(f"VM {vm_uuid} has no disk to move", field="vmUuid")
    planned: list[DiskPlan] = []
    skipped: list[SkippedDisk] = []
    layers: dict[str, LayerPlan] = {}
    listed: set[int] = set()
    for index, disk in enumerate(disks):
        is_root = disk is root
        entry = _listed(disk, request) if precreated else None
        reason = _skip_reason(disk, is_root, psm.withDataVolumes or precreated, kinds)
        if precreated and entry is None and reason is None:
            reason = "not listed in volumes (only disks with a pre-created target move)"
        if reason is not None:
            if entry is not None:
                raise PreflightFailed(f"disk {disk.target} cannot move: {reason}", field=f"volumes[{entry}]")
            if is_root and not precreated and disk.device == "disk" and _source_kind(disk) not in kinds:
                named = disk.location or disk.source or disk.type
                raise StorageKindUnsupported(
                    f"the root disk {disk.target} ({named}) cannot move: {reason}",
                    field="vmUuid",
                    details="docs/storage.md says which moves read which kinds",
                )
            if is_root and not precreated:
                raise PreflightFailed(f"the root disk {disk.target} cannot move: {reason}", field="vmUuid")
            skipped.append(SkippedDisk(disk.target, disk.source, reason))
            continue
        if entry is not None:
            listed.add(entry)
            if not request.volumes[entry].dstInstallPath:
                raise InvalidRequest(
                    "a pre-created target needs its path", field=f"volumes[{entry}].dstInstallPath"
                )
        if disk.mirror:
            raise PreflightFailed(
                f"disk {disk.target} already has a block job",
                field="vmUuid",
                details="wait for it to finish or abort it (virsh blockjob --abort) first",
            )
        chain = list(chains[disk.target])
        top = chain[0]
        uuid = volume_uuid(disk, request)
        dst_top = _dst_top_for(disk, index, request, dst_root, volume=uuid, size=top.virtual_size, free=free)
        as_snapshots = (
            rbd_snapshots is None
            and dst_kind is StorageKind.RBD
            and psm.withSnapshots
            and len(chain) > 1
            and not precreated
            and all(layer.virtual_size == top.virtual_size for layer in chain)
        )
        flatten = not psm.withSnapshots or len(chain) == 1 or (one_layer and not as_snapshots)
        if one_layer and psm.withSnapshots and len(chain) > 1 and not as_snapshots:
            notes.append(
                f"{disk.target}: its {len(chain)} layers are flattened into one raw {dst_kind} volume ("
                + (rbd_snapshots or "its layers differ in size, an RBD snapshot keeps the image's")
                + ")"
            )
        lower: list[LayerPlan] = []
        dst_backing = dst_backing_fmt = None
        if as_snapshots:
            # Each lower layer written into the image over the one below it, then snapshotted; the top is
            # mirrored shallow onto the image, which holds the chain below it by then.
            for layer in reversed(chain[1:]):  # base first
                lower.append(
                    LayerPlan(
                        src=layer.path,
                        dst=f"{dst_top}@{snapshot_name(layer.path)}",
                        format=layer.format,
                        virtual_size=layer.virtual_size,
                        actual_size=layer.actual_size,
                        backing_dst=None,
                        backing_format=None,
                        cluster_size=layer.cluster_size,
                    )
                )
                layers[lower[-1].dst] = lower[-1]
            notes.append(
                f"{disk.target}: its {len(lower)} lower layers are kept as snapshots of {dst_top}, oldest "
                "first: " + ", ".join(lp.dst.rsplit("@", 1)[1] for lp in lower)
            )
        elif not flatten and not precreated:
            dst_dir = os.path.dirname(dst_top)
            below_dst: str | None = None
            below_fmt: str | None = None
            for layer in reversed(chain[1:]):  # base first
                dst = str(
                    dst_root.confine(os.path.join(dst_dir, os.path.basename(layer.path)), f"volumes[{index}]")
                )
                plan = layers.get(layer.path) or LayerPlan(
                    src=layer.path,
                    dst=dst,
                    format=layer.format,
                    virtual_size=layer.virtual_size,
                    actual_size=layer.actual_size,
                    backing_dst=below_dst,
                    backing_format=below_fmt,
                    cluster_size=layer.cluster_size,
                )
                layers[layer.path] = plan
                lower.append(plan)
                below_dst, below_fmt = plan.dst, plan.format
            dst_backing, dst_backing_fmt = below_dst, below_fmt
        estimated = top.actual_size if not flatten else sum(layer.actual_size for layer in chain)
        planned.append(
            DiskPlan(
                target=disk.target,
                volume_uuid=uuid,
                role="Root" if is_root else "Data",
                src_top=top.path,
                src_format=top.format,
                dst_top=dst_top,
                dst_format=_dst_format(top.format, flatten=flatten, one_layer=one_layer),
                virtual_size=top.virtual_size,
                flatten=flatten,
                lower_layers=tuple(lower),
                dst_backing=dst_backing,
                dst_backing_format=dst_backing_fmt,
                src_chain=tuple(layer.path for layer in chain),
                estimated_bytes=estimated,
                precreated=precreated,
                src_kind=_source_kind(disk) or StorageKind.FILE,
                dst_kind=dst_kind,
            )
        )
    if precreated:
        for i, mapping in enumerate(request.volumes):
            if i not in listed:
                raise InvalidRequest(
                    f"{mapping.installPath or mapping.uuid} is not a disk of VM {vm_uuid} that can move",
                    field=f"volumes[{i}]",
                )
        if not planned:
            raise InvalidRequest("no disk listed in volumes: nothing to move", field="volumes")
    _check_distinct_targets(planned, layers)
    return MigrationPlan(
        vm_uuid,
        dst_root.uuid,
        tuple(planned),
        tuple(skipped),
        tuple(layers.values()),
        dst_rbd=dst_rbd if dst_kind is StorageKind.RBD else None,
        notes=tuple(notes),
    )


def _dst_format(src_format: str, *, flatten: bool, one_layer: bool) -> str:
    """Raw onto a kind that holds one raw volume (RBD, block); else qcow2, unless a flat raw stays raw."""
    if one_layer:
        return "raw"
    return "qcow2" if (not flatten or src_format == "qcow2") else src_format


def _check_distinct_targets(disks: Sequence[DiskPlan], layers: Mapping[str, LayerPlan]) -> None:
    seen: dict[str, str] = {}
    for disk in disks:
        for path, what in [(disk.dst_top, disk.target)] + [(lp.dst, lp.src) for lp in disk.lower_layers]:
            owner = seen.setdefault(path, what)
            if owner != what:
                raise InvalidRequest(
                    f"two images would be written to {path} ({owner} and {what})",
                    field="volumes",
                    details="give distinct dstInstallPath values",
                )
        if disk.dst_top in disk.src_chain or any(lp.dst == lp.src for lp in layers.values()):
            raise InvalidRequest(
                f"{disk.target} already lives in the destination storage",
                field=("primaryStorageMigrateVm.dstPrimaryStorageUuid"),
            )


async def inspect_chains(
    disks: Sequence[DiskXml], rbd_sizes: Mapping[str, int] | None = None
) -> dict[str, list[ImageInfo]]:
    """qemu-img's view of every file or block disk's chain, keyed by target (a device's format as libvirt
    has it, never probed from the guest's bytes). An RBD image is one raw layer of the size its QEMU gives
    (``rbd_sizes``, by target: the agent holds no Ceph key to ask the image itself); its actual size is
    not known before its allocation is mapped (``allocation_index``), so the whole size stands for it."""
    chains: dict[str, list[ImageInfo]] = {}
    for disk in disks:
        if (
            disk.device == "disk"
            and _source_kind(disk) is StorageKind.RBD
            and disk.target in (rbd_sizes or {})
        ):
            size = (rbd_sizes or {})[disk.target]
            assert disk.location is not None
            chains[disk.target] = [
                ImageInfo(disk.location, disk.format or "raw", size, size, None, None, None)
            ]
            continue
        if disk.device == "disk" and disk.type == "file" and disk.source:
            chains[disk.target] = await qemuimg.backing_chain(disk.source)
        elif disk.device == "disk" and disk.type == "block" and disk.source:
            chain = await qemuimg.backing_chain(disk.source, disk.format or "raw")
            if disk.slice_size is not None:  # the guest sees the slice, not the whole device
                chain[0] = dataclasses.replace(chain[0], virtual_size=disk.slice_size)
            chains[disk.target] = chain
    return chains


async def allocation_index(
    disk: DiskPlan, live: Callable[[], Awaitable[list[Extent]]] | None = None
) -> AllocationIndex:
    """Where the bytes a mirror of ``disk`` moves are: data in any layer when flattening, else in the top.
    ``live``: how to map the source through the QEMU that has it open (an RBD image, see
    ``agent.virt.livemap``)."""
    if disk.src_kind is StorageKind.RBD:
        if live is None:
            raise PreflightFailed(f"{disk.src_top}: an RBD image is mapped only through its running QEMU")
        extents = await live()
    else:
        extents = await qemuimg.allocation_map(disk.src_top, disk.src_format)
    return AllocationIndex((e.start, e.length) for e in extents if e.data and (disk.flatten or e.depth == 0))


class RemoteRoot(StorageRoot):
    """The destination storage seen from the source: names only; the destination agent confines them."""

    def confine(self, path: str | Path, field: str) -> Path:
        return Path(path)


@dataclass(frozen=True)
class RemoteVolumes:
    """Another host's RBD pool or block storage seen from the source: each disk becomes one raw volume
    there, named by its volume uuid (or the request's ``dstInstallPath``) and placed by the destination agent
    (an image in its pool, a device it picks), which confines every name."""

    uuid: str
    kind: StorageKind

    @property
    def location(self) -> str:
        return f"{self.kind} storage {self.uuid} on the destination host"

    def confine(self, path: str | Path, field: str) -> str:
        return str(path)
