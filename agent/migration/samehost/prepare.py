"""PREPARING: plan from the live XML and the qemu-img chains, check the caller's pre-created targets, and
refuse before anything is written (VM running, no block job, space, targets absent or identical layers)."""

from __future__ import annotations

import dataclasses
import os

from agent.config import StorageKind
from agent.errors import Code, PreflightFailed, StorageError
from agent.migration import snapshots
from agent.migration.devices import check_device, free_devices, used_here
from agent.migration.engine import TaskContext
from agent.migration.plan import (
    KINDS,
    LayerPlan,
    MigrationPlan,
    inspect_chains,
    plan_migration,
)
from agent.migration.targets import check_precreated_target, check_same_content_below
from agent.migration.volumes import CLAIMED_DEVICES, claim_devices, rbd_access, snapshots_refused
from agent.storage import qemuimg, rbdimages
from agent.storage.blockdir import BlockDir
from agent.storage.locations import is_rbd, parse_rbd
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoot, StorageRoots
from agent.storage.space import check_free_space
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost
from agent.virt.states import DomainState


async def plan_move(host: VirtHost, roots: StorageRoots, ctx: TaskContext) -> MigrationPlan:
    state = await host.domain_state(ctx.vm_uuid)
    if state not in (DomainState.RUNNING, DomainState.PAUSED):
        raise PreflightFailed(
            f"VM {ctx.vm_uuid} is {state}; a live storage migration needs it running",
            field="vmUuid",
        )
    disks = parse_disks(await host.live_xml(ctx.vm_uuid))
    rbd_sizes = {
        d.target: await host.block_capacity(ctx.vm_uuid, d.target)
        for d in disks
        if d.device == "disk" and d.type == "network" and d.location and is_rbd(d.location)
    }
    chains = await inspect_chains(disks, rbd_sizes)
    dst = roots.storage(ctx.request.primaryStorageMigrateVm.dstPrimaryStorageUuid)
    rbd = free = None
    if isinstance(dst, RbdPool):
        rbd = rbd_access(dst)  # the secret and the pool are checked in ``preflight``
    elif isinstance(dst, BlockDir):
        # No await from here to the claim: a device another task claimed meanwhile is not offered.
        free = [f for f in await free_devices(host, dst) if f[0] not in CLAIMED_DEVICES]
    plan = plan_migration(
        ctx.vm_uuid,
        disks,
        chains,
        ctx.request,
        dst,
        dst_rbd=rbd,
        free_devices=free or (),
        kinds=KINDS,
        rbd_snapshots=snapshots_refused(dst),
    )
    snapshots.refuse_internal({d.target: chains[d.target] for d in plan.disks})
    if isinstance(dst, BlockDir):
        claim_devices([d.dst_top for d in plan.disks])  # released when the task ends (SameHostEngine)
    return plan


async def check_precreated(host: VirtHost, roots: StorageRoots, plan: MigrationPlan) -> MigrationPlan:
    """Check the targets the caller made (``agent.migration.targets``); their backing joins the plan. An
    RBD image made by the caller (ZStack makes it before `/vm/blklivemigration`) must exist and be of the
    disk's size: QEMU's mirror refuses a target of another size, and no slice is put on an image."""
    disks = []
    for disk in plan.disks:
        if disk.precreated and disk.dst_kind is StorageKind.RBD:
            await _check_precreated_image(host, roots, disk.dst_top, disk.virtual_size)
        elif disk.precreated:
            chain = await check_precreated_target(
                disk.dst_top,
                fmt=disk.dst_format,
                virtual_size=disk.virtual_size,
                flatten=disk.flatten,
                field="volumes",
            )
            if not disk.flatten:
                await check_same_content_below(disk.src_chain, chain, "volumes")
                disk = dataclasses.replace(
                    disk, dst_backing=chain[1].path, dst_backing_format=chain[1].format
                )
        disks.append(disk)
    return dataclasses.replace(plan, disks=tuple(disks))


async def _check_precreated_image(host: VirtHost, roots: StorageRoots, location: str, size: int) -> None:
    storage = roots.owner_of_location(location)
    assert isinstance(storage, RbdPool)  # the plan confined it there
    found = await rbdimages.image_size(host, storage, parse_rbd(location, "volumes"))
    if found is None:
        raise PreflightFailed(
            f"the pre-created target {location} does not exist",
            code=Code.TARGET_MISMATCH,
            field="volumes",
            details="create the image first, or send the request without targetsPrecreated",
        )
    if found != size:
        raise PreflightFailed(
            f"the pre-created target {location} is {found} bytes, the disk {size}",
            code=Code.TARGET_MISMATCH,
            field="volumes",
            details="an RBD target must be of the disk's size (rbd resize it, or let the agent create it)",
        )


async def preflight(host: VirtHost, roots: StorageRoots, ctx: TaskContext, plan: MigrationPlan) -> list[str]:
    """Refuse before writing anything; returns the lower layers already present and identical."""
    dst = roots.storage(plan.dst_storage_uuid)
    used = await used_here(host) if isinstance(dst, BlockDir) else set()
    for disk in plan.disks:
        if disk.src_kind is StorageKind.RBD and not isinstance(
            roots.owner_of_location(disk.src_top), RbdPool
        ):
            raise PreflightFailed(
                f"disk {disk.target} is on {disk.src_top}, in no RBD storage of this host",
                field="vmUuid",
                code=Code.STORAGE_KIND_UNSUPPORTED,
                details="the agent moves an RBD image only from a pool in its configuration ([[storage]] "
                "kind = 'rbd'): a copy back on failure needs that pool's monitors, user and secret",
            )
        if await host.block_job(ctx.vm_uuid, disk.target) is not None:
            raise PreflightFailed(
                f"disk {disk.target} of VM {ctx.vm_uuid} already has a block job",
                field="vmUuid",
                details="wait for it to finish or abort it first",
            )
        if isinstance(dst, BlockDir):
            await check_device(dst, disk, used)
        elif isinstance(dst, RbdPool):
            if disk.precreated:
                continue  # the caller's image, checked in ``check_precreated``
            if await rbdimages.image_exists(host, dst, parse_rbd(disk.dst_top, "volumes")):
                raise PreflightFailed(
                    f"target {disk.dst_top} already exists",
                    field="volumes",
                    code=Code.TARGET_EXISTS,
                    details="remove the image or choose another dstInstallPath",
                )
        elif not disk.precreated and os.path.lexists(disk.dst_top):
            raise PreflightFailed(
                f"target {disk.dst_top} already exists",
                field="volumes",
                code=Code.TARGET_EXISTS,
                details="remove it or choose another dstInstallPath",
            )
    reused = []
    for layer in plan.layers:
        if os.path.lexists(layer.dst):
            if await _identical_layer(layer):
                ctx.log.info("reusing identical copy of %s at %s", layer.src, layer.dst)
                reused.append(layer.dst)
                continue
            raise PreflightFailed(
                f"{layer.dst} exists and is not a copy of {layer.src}",
                code=Code.TARGET_EXISTS,
                field="volumes",
                details="remove the stale file or choose another destination",
            )
    needed = sum(layer.actual_size for layer in plan.layers if layer.dst not in reused)
    needed += sum(d.estimated_bytes for d in plan.disks)
    if isinstance(dst, StorageRoot):
        await check_free_space(dst, needed, field="primaryStorageMigrateVm.dstPrimaryStorageUuid")
    elif isinstance(dst, RbdPool):
        room = await rbdimages.check_access(host, dst)
        if room.known and room.available < needed:
            raise PreflightFailed(
                f"pool {dst.pool} has {room.available} bytes available, the move needs {needed}",
                code=Code.NO_SPACE,
                field="primaryStorageMigrateVm.dstPrimaryStorageUuid",
            )
        if not room.known:
            ctx.log.info("pool %s reports no sizes: its room was not checked", dst.pool)
    return reused


async def _identical_layer(layer: LayerPlan) -> bool:
    try:
        info = await qemuimg.info(layer.dst)
    except StorageError:
        return False
    if info.format != layer.format or info.virtual_size != layer.virtual_size:
        return False
    if (info.backing or None) != layer.backing_dst:
        return False
    return await qemuimg.compare(layer.src, layer.dst)
