"""Before the migration: plan it here, have the destination agent prepare the targets (``incoming``), and
fill the destination's lower layers over the transfer service."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import StorageKind
from agent.errors import Code, MigrationFailed, PreflightFailed
from agent.migration import snapshots
from agent.migration.crosshost.work import CrossHostWork
from agent.migration.engine import TaskContext, budget_of
from agent.migration.peer.client import DestinationAgent
from agent.migration.peer.layers import LayerToSend, send_layers_to_peer
from agent.migration.peer.wire import IncomingDisk, IncomingSpec
from agent.migration.plan import (
    DATA_VOLUME_LEFT,
    KINDS,
    MigrationPlan,
    RemoteRoot,
    RemoteVolumes,
    inspect_chains,
    plan_migration,
)
from agent.storage import sharedfs
from agent.storage.locations import is_rbd
from agent.virt.domxml import parse_disks
from agent.virt.host import VirtHost
from agent.virt.states import DomainState


async def plan_live_move(host: VirtHost, ctx: TaskContext, peer: DestinationAgent) -> MigrationPlan:
    """Plan from the live XML and the chains; refuse a VM that is not running, a disk with a block job,
    and libvirt snapshots whose layers a flattening move would lose. Disks are read from files, block
    devices or RBD images; onto the destination's RBD pool or block storage each becomes one raw volume
    (the destination agent says which kind its storage is)."""
    state = await host.domain_state(ctx.vm_uuid)
    if state != DomainState.RUNNING:
        raise PreflightFailed(
            f"VM {ctx.vm_uuid} is {state}; a live migration needs it running", field="vmUuid"
        )
    disks = parse_disks(await host.live_xml(ctx.vm_uuid))
    for disk in disks:
        if disk.mirror:
            raise PreflightFailed(f"disk {disk.target} already has a block job", field="vmUuid")
    rbd_sizes = {
        d.target: await host.block_capacity(ctx.vm_uuid, d.target)
        for d in disks
        if d.device == "disk" and d.type == "network" and d.location and is_rbd(d.location)
    }
    chains = await inspect_chains(disks, rbd_sizes)
    dst_uuid = ctx.request.primaryStorageMigrateVm.dstPrimaryStorageUuid
    kind = await destination_kind(peer, dst_uuid)
    dst = RemoteRoot(dst_uuid, Path("/")) if kind is StorageKind.FILE else RemoteVolumes(dst_uuid, kind)
    plan = plan_migration(
        ctx.vm_uuid,
        disks,
        chains,
        ctx.request,
        dst,
        kinds=KINDS,
        rbd_snapshots="across hosts libvirt 9.0 copies onto an RBD image only by a full mirror, which would "
        "write the lower layers' data into the image's head again: done on one host",
    )
    snapshots.refuse_internal({d.target: chains[d.target] for d in plan.disks})
    refuse_local_disks_left(plan)
    metas = await host.call_domain(ctx.vm_uuid, snapshots.read_snapshots)
    if metas and any(d.flatten and len(d.src_chain) > 1 for d in plan.disks):
        raise PreflightFailed(
            "the VM has libvirt snapshots ("
            + ", ".join(m.name for m in metas)
            + ") whose layers a flattening move would not keep",
            code=Code.SNAPSHOTS_NEED_CHAIN,
            field="primaryStorageMigrateVm.withSnapshots",
            details="move it with withSnapshots: true, or delete the snapshots first",
        )
    return plan


async def destination_kind(peer: DestinationAgent, storage_uuid: str) -> StorageKind:
    """The kind of the destination's storage ``storage_uuid``, from what its agent offers peers. A storage
    it does not list is left to its ``prepare`` to refuse (it names the storages it has)."""
    for entry in await peer.storages():
        if entry.get("uuid") == storage_uuid:
            try:
                return StorageKind(entry.get("kind", "file"))
            except ValueError:
                raise MigrationFailed(
                    f"the destination's storage {storage_uuid} is of kind {entry.get('kind')!r}, which this "
                    "agent does not know",
                    code=Code.STORAGE_KIND_UNSUPPORTED,
                    field="primaryStorageMigrateVm.dstPrimaryStorageUuid",
                ) from None
    return StorageKind.FILE


def refuse_local_disks_left(plan: MigrationPlan, mounts: str | None = None) -> None:
    """A data volume left on this host's local storage would be out of the VM's reach on the other host:
    refused now, naming it (libvirt would refuse it later, "Migration without shared storage is unsafe",
    after the destination was prepared). One on a filesystem other hosts mount too may stay."""
    for left in plan.skipped:
        if left.reason == DATA_VOLUME_LEFT and left.source and not sharedfs.is_shared(left.source, mounts):
            raise PreflightFailed(
                f"data volume {left.target} ({left.source}) would stay on this host's local storage, out of "
                "the VM's reach on the destination host",
                field="primaryStorageMigrateVm.withDataVolumes",
                details="move it too (withDataVolumes: true), or detach it before moving the VM",
            )


def incoming_spec(ctx: TaskContext, plan: MigrationPlan) -> IncomingSpec:
    """What the destination agent prepares: an empty top on its copy of each kept chain."""
    return IncomingSpec.of(ctx.task_uuid, plan, (IncomingDisk.live(d) for d in plan.disks))


async def send_layers(ctx: TaskContext, peer: DestinationAgent, work: CrossHostWork) -> None:
    """Fill the destination's lower layers, base first, each verified before the next (journalled in
    ``work.layers_done``)."""
    if not work.plan.layers:
        return

    done = work.layers_done
    dst_path: dict[tuple[str, int], str] = {}
    todo: list[LayerToSend] = []
    for disk in work.plan.disks:
        paths = work.destination.disk(disk.target).layers
        for index, (layer, path) in enumerate(zip(disk.lower_layers, paths, strict=True)):
            if path in done or path in dst_path.values():  # sent before a restart, or a shared base
                continue
            dst_path[disk.target, index] = path
            item = f"layer:{os.path.basename(layer.src)}"
            todo.append(LayerToSend(disk.target, index, layer.src, layer.format, item))

    async def sent(layer: LayerToSend) -> None:
        done[dst_path[layer.target, layer.index]] = layer.src
        await work.checkpoint(ctx)

    await send_layers_to_peer(
        peer, ctx.task_uuid, todo, rate=lambda: budget_of(ctx), progress=ctx.progress, log=ctx.log, sent=sent
    )
