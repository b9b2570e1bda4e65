"""What the source agent asks the destination to prepare: the incoming migration's wire format.

The spec names every disk's destination top and lower layers by file name; the destination confines them in
its storage root (``IncomingService.prepare``). A live move sends the lower layers and lets the migration
fill an empty top (``IncomingDisk.live``); an offline move sends every layer, the top included
(``IncomingDisk.offline``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.config import StorageKind
from agent.errors import Code, MigrationFailed
from agent.migration.plan import DiskPlan, LayerPlan, MigrationPlan
from agent.migration.request import normalise_uuid
from agent.virt.domxml import RbdAccess, VolumeSource


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IncomingLayer(_Wire):
    name: str = Field(max_length=255, description="file name (or absolute path) at the destination")
    format: str = Field(pattern="^(qcow2|raw)$")
    virtualSize: int = Field(ge=0)
    actualSize: int = Field(ge=0)
    clusterSize: int | None = Field(
        default=None, ge=512, le=2 * 1024 * 1024, description="qcow2 cluster size of the source layer"
    )

    @classmethod
    def of(cls, layer: LayerPlan) -> IncomingLayer:
        """The wire form of a planned lower layer (named by its file name; the destination places it)."""
        return cls(
            name=os.path.basename(layer.src),
            format=layer.format,
            virtualSize=layer.virtual_size,
            actualSize=layer.actual_size,
            clusterSize=layer.cluster_size,
        )


class IncomingDisk(_Wire):
    target: str = Field(pattern="^[a-z]{2,3}[a-z]{1,2}$")
    volumeUuid: str = Field(max_length=64)
    top: str = Field(max_length=4096, description="file name or absolute path of the destination top")
    format: str = Field(pattern="^(qcow2|raw)$")
    virtualSize: int = Field(ge=0)
    estimatedBytes: int = Field(ge=0)
    flatten: bool
    layers: list[IncomingLayer] = Field(default_factory=list, max_length=64)  # base first
    offline: bool = Field(
        default=False,
        description="the VM is shut off: every layer, the top included (the last one), is transferred",
    )
    precreated: bool = Field(
        default=False, description="the target exists already; check it, never create it"
    )

    @classmethod
    def live(cls, disk: DiskPlan) -> IncomingDisk:
        """A running VM's disk: its lower layers travel first, the migration fills the top made there."""
        return cls(
            target=disk.target,
            volumeUuid=disk.volume_uuid,
            top=str(disk.dst_top),
            format=disk.dst_format,
            virtualSize=disk.virtual_size,
            estimatedBytes=disk.estimated_bytes,
            flatten=disk.flatten,
            precreated=disk.precreated,
            layers=[IncomingLayer.of(lp) for lp in disk.lower_layers],
        )

    @classmethod
    def offline_copy(cls, disk: DiskPlan) -> IncomingDisk:
        """A shut-off VM's disk: every layer travels, the top included: it is one more layer of a chain
        nobody writes (a flattened disk has no lower layers: it travels as its one flat layer)."""
        top = IncomingLayer(
            name=os.path.basename(str(disk.dst_top)),
            format=disk.dst_format,
            virtualSize=disk.virtual_size,
            actualSize=disk.estimated_bytes,
        )
        return cls(
            target=disk.target,
            volumeUuid=disk.volume_uuid,
            top=str(disk.dst_top),
            format=disk.dst_format,
            virtualSize=disk.virtual_size,
            estimatedBytes=0,
            flatten=True,
            layers=[*(IncomingLayer.of(lp) for lp in disk.lower_layers), top],
            offline=True,
        )


class IncomingSpec(_Wire):
    migrationId: str
    vmUuid: str
    dstPrimaryStorageUuid: str
    disks: list[IncomingDisk] = Field(min_length=1, max_length=64)
    domain: str | None = Field(
        default=None,
        max_length=512 * 1024,
        description="the VM's definition on the source, for a move that defines it here (offline): the "
        "destination later defines only this, with the disk sources on the prepared images",
    )

    # The migration id names the record file and both ids reach libvirt: anything but a uuid is a 400
    # (found by the API fuzzing: a malformed id was a 500).
    @field_validator("migrationId", "vmUuid")
    @classmethod
    def _uuid(cls, value: str) -> str:
        return normalise_uuid(value)

    @classmethod
    def of(
        cls,
        migration_id: str,
        plan: MigrationPlan,
        disks: Iterable[IncomingDisk],
        *,
        domain: str | None = None,
    ) -> IncomingSpec:
        return cls(
            migrationId=migration_id,
            vmUuid=plan.vm_uuid,
            dstPrimaryStorageUuid=plan.dst_storage_uuid,
            disks=list(disks),
            domain=domain,
        )


class _Answer(BaseModel):
    """An answer of the destination agent: what this side reads of it is typed; what a newer destination
    adds is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class PreparedRbd(_Answer):
    """How the destination's QEMU reaches the RBD pool of a prepared image (the destination's own monitors,
    cephx user and libvirt secret: the source writes them into the destination XML only)."""

    monitors: tuple[tuple[str, int], ...] = Field(min_length=1)
    user: str
    secretUuid: str


class PreparedDisk(_Answer):
    target: str
    top: str = Field(description="the destination top the migration fills (or the last layer sent)")
    layers: tuple[str, ...] = Field(default=(), description="the lower layers' paths there, base first")
    kind: StorageKind = Field(
        default=StorageKind.FILE, description="file: a path; rbd: rbd:pool/image; block: a device path"
    )
    size: int | None = Field(
        default=None, ge=0, description="a block device larger than the disk: the bytes the guest sees"
    )
    rbd: PreparedRbd | None = None

    def source(self, fmt: str) -> VolumeSource:
        """The prepared top as libvirt names it in the destination XML."""
        access = None
        if self.rbd is not None:
            access = RbdAccess(self.rbd.monitors, self.rbd.user, self.rbd.secretUuid)
        return VolumeSource(self.kind, self.top, fmt, access, self.size)


class Prepared(_Answer):
    """The destination's answer to ``prepare``: where each disk goes there and how to reach its libvirt.
    Journalled as its JSON (``model_dump``) and read back with ``model_validate`` on a resume."""

    migrationId: str
    disks: tuple[PreparedDisk, ...]
    libvirtUri: str = Field(description="the destination libvirtd, as the source's libvirtd reaches it")
    migrationUri: str = Field(description="where QEMU's migration stream goes (tcp://address)")

    def disk(self, target: str) -> PreparedDisk:
        """The destination's paths for ``target``; an answer without them cannot be migrated into."""
        for disk in self.disks:
            if disk.target == target:
                return disk
        raise MigrationFailed(
            f"the destination agent's answer to prepare names no disk {target}",
            code=Code.PEER_ERROR,
            details=f"it named {', '.join(d.target for d in self.disks) or 'none'}",
        )

    def tops(self) -> dict[str, str]:
        """target -> destination top."""
        return {d.target: d.top for d in self.disks}
