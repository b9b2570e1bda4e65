"""PREPARING: plan from the live XML and the qemu-img chains, check the caller's pre-created targets, and
refuse before anything is written (VM running, no block job, space, targets absent or identical layers)."""

from __future__ import annotations

import dataclasses
import os

from agent.errors import Code, PreflightFailed, StorageError
from agent.migration import snapshots
from agent.migration.engine import TaskContext
from agent.migration.plan import LayerPlan, MigrationPlan, inspect_chains, plan_migration
from agent.migration.targets import check_precreated_target, check_same_content_below
from agent.storage import qemuimg
from agent.storage.roots import StorageRoots
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
    chains = await inspect_chains(disks)
    dst_root = roots.get(ctx.request.primaryStorageMigrateVm.dstPrimaryStorageUuid)
    plan = plan_migration(ctx.vm_uuid, disks, chains, ctx.request, dst_root)
    snapshots.refuse_internal({d.target: chains[d.target] for d in plan.disks})
    return plan


async def check_precreated(plan: MigrationPlan) -> MigrationPlan:
    """Check the targets the caller made (``agent.migration.targets``); their backing joins the plan."""
    disks = []
    for disk in plan.disks:
        if disk.precreated:
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


async def preflight(host: VirtHost, roots: StorageRoots, ctx: TaskContext, plan: MigrationPlan) -> list[str]:
    """Refuse before writing anything; returns the lower layers already present and identical."""
    for disk in plan.disks:
        if await host.block_job(ctx.vm_uuid, disk.target) is not None:
            raise PreflightFailed(
                f"disk {disk.target} of VM {ctx.vm_uuid} already has a block job",
                field="vmUuid",
                details="wait for it to finish or abort it first",
            )
        if not disk.precreated and os.path.lexists(disk.dst_top):
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
    root = roots.get(plan.dst_storage_uuid)
    await check_free_space(root, needed, field="primaryStorageMigrateVm.dstPrimaryStorageUuid")
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
