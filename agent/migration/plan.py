"""Planning a storage migration: which disks move, where each layer goes, how many bytes will move.

``plan_migration`` is pure (domain XML facts and chains in, a plan out) so the rules are unit tested without
libvirt; ``inspect_chains`` gathers the chains with qemu-img.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.config import StorageKind
from agent.errors import InvalidRequest, PreflightFailed
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.request import MigrationRequest
from agent.storage import qemuimg
from agent.storage.qemuimg import ImageInfo
from agent.storage.roots import StorageRoot
from agent.virt.domxml import DiskXml, RbdAccess, VolumeSource


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

    def src_source(self, rbd: RbdAccess | None = None) -> VolumeSource:
        """The source top as libvirt names it (``rbd``: how to reach its pool, for an RBD image)."""
        return VolumeSource(self.src_kind, self.src_top, self.src_format, rbd)

    def dst_source(self, rbd: RbdAccess | None = None) -> VolumeSource:
        """The destination top as libvirt names it (``rbd``: how to reach its pool, for an RBD image)."""
        return VolumeSource(self.dst_kind, self.dst_top, self.dst_format, rbd)


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

    @property
    def bytes_total(self) -> int:
        return sum(d.estimated_bytes for d in self.disks) + sum(layer.actual_size for layer in self.layers)

    @property
    def shallow_mirrors(self) -> bool:
        """Whether a shallow mirror (QEMU ``sync: top``) of every disk copies all it needs: the top layer onto
        a prepared chain, or the data of a disk without a backing file onto a fresh image. Only flattening a
        real chain, or a pre-created image that may hold old data, needs a full copy, which QEMU charges
        for the whole virtual size when the target is an NBD export (holes included; LAB-NOTES)."""
        return all(not d.flatten or (len(d.src_chain) == 1 and not d.precreated) for d in self.disks)

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
        return cls(
            vm_uuid=data["vm_uuid"],
            dst_storage_uuid=data["dst_storage_uuid"],
            disks=disks,
            skipped=tuple(SkippedDisk(**s) for s in data["skipped"]),
            layers=tuple(LayerPlan(**lp) for lp in data["layers"]),
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


def _skip_reason(disk: DiskXml, is_root: bool, with_data: bool) -> str | None:
    if disk.device != "disk":
        return f"{disk.device} devices stay where they are"
    if disk.type != "file" or disk.source is None:
        return f"{disk.type} disks are not file images on this host"
    if disk.readonly:
        return "read-only disks stay where they are"
    if disk.shareable:
        return "shareable disks are used by other VMs too"
    if not is_root and not with_data:
        return "data volume, and withDataVolumes is false"
    return None


def _listed(disk: DiskXml, request: MigrationRequest) -> int | None:
    """Index of the ``volumes`` entry naming this disk (by install path, or uuid = serial), else None."""
    for i, mapping in enumerate(request.volumes):
        if (
            mapping.installPath
            and disk.source
            and os.path.realpath(mapping.installPath) == os.path.realpath(disk.source)
        ):
            return i
        if mapping.uuid and disk.serial and mapping.uuid == disk.serial:
            return i
    return None


def _dst_top_for(disk: DiskXml, index: int, request: MigrationRequest, root: StorageRoot) -> str:
    for i, mapping in enumerate(request.volumes):
        if not mapping.dstInstallPath:
            continue
        matches_path = (
            mapping.installPath
            and disk.source
            and (os.path.realpath(mapping.installPath) == os.path.realpath(disk.source))
        )
        matches_uuid = mapping.uuid and mapping.uuid in (disk.serial,)
        if matches_path or matches_uuid:
            return str(root.confine(mapping.dstInstallPath, f"volumes[{i}].dstInstallPath"))
    assert disk.source is not None
    return str(root.confine(Path(disk.source).name, f"volumes[{index}]"))


def plan_migration(
    vm_uuid: str,
    disks: Sequence[DiskXml],
    chains: Mapping[str, Sequence[ImageInfo]],
    request: MigrationRequest,
    dst_root: StorageRoot,
) -> MigrationPlan:
    """Decide the moves. ``chains`` maps a disk target to its chain (top first) from qemu-img.

    With ``request.targetsPrecreated`` exactly the disks listed in ``volumes`` move (the root too only when
    listed), each onto its ``dstInstallPath``, and no lower layer is planned: the caller's target either is
    flat (filled completely) or already has its backing chain.
    """
    psm = request.primaryStorageMigrateVm
    precreated = request.targetsPrecreated
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
        reason = _skip_reason(disk, is_root, psm.withDataVolumes or precreated)
        if precreated and entry is None and reason is None:
            reason = "not listed in volumes (only disks with a pre-created target move)"
        if reason is not None:
            if entry is not None:
                raise PreflightFailed(f"disk {disk.target} cannot move: {reason}", field=f"volumes[{entry}]")
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
        dst_top = _dst_top_for(disk, index, request, dst_root)
        flatten = not psm.withSnapshots or len(chain) == 1
        lower: list[LayerPlan] = []
        dst_backing = dst_backing_fmt = None
        if not flatten and not precreated:
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
                volume_uuid=volume_uuid(disk, request),
                role="Root" if is_root else "Data",
                src_top=top.path,
                src_format=top.format,
                dst_top=dst_top,
                dst_format="qcow2" if (not flatten or top.format == "qcow2") else top.format,
                virtual_size=top.virtual_size,
                flatten=flatten,
                lower_layers=tuple(lower),
                dst_backing=dst_backing,
                dst_backing_format=dst_backing_fmt,
                src_chain=tuple(layer.path for layer in chain),
                estimated_bytes=estimated,
                precreated=precreated,
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
    return MigrationPlan(vm_uuid, dst_root.uuid, tuple(planned), tuple(skipped), tuple(layers.values()))


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


async def inspect_chains(disks: Sequence[DiskXml]) -> dict[str, list[ImageInfo]]:
    """qemu-img's view of every file disk's chain, keyed by target."""
    chains: dict[str, list[ImageInfo]] = {}
    for disk in disks:
        if disk.device == "disk" and disk.type == "file" and disk.source:
            chains[disk.target] = await qemuimg.backing_chain(disk.source)
    return chains


async def allocation_index(disk: DiskPlan) -> AllocationIndex:
    """Where the bytes a mirror of ``disk`` moves are: data in any layer when flattening, else in the top."""
    extents = await qemuimg.allocation_map(disk.src_top)
    return AllocationIndex((e.start, e.length) for e in extents if e.data and (disk.flatten or e.depth == 0))


class RemoteRoot(StorageRoot):
    """The destination storage seen from the source: names only; the destination agent confines them."""

    def confine(self, path: str | Path, field: str) -> Path:
        return Path(path)
