"""VERIFYING: the live XML shows the new paths; the persistent definition is rewritten to them (libvirt 9.0
only updates the live definition on pivot) and read back; every chain is as planned. libvirt's snapshot
metadata then points at the moved files."""

from __future__ import annotations

from typing import Any

from agent.config import StorageKind
from agent.errors import AgentError, Code, MigrationFailed
from agent.migration import snapshots
from agent.migration.engine import TaskContext
from agent.migration.inventory import volume_inventory
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.migration.samehost.work import Work
from agent.storage import qemuimg
from agent.storage.locations import parse_rbd
from agent.storage.rbdkey import keyed
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoots
from agent.virt.domxml import parse_disks, rewrite_disk_sources
from agent.virt.host import VirtHost


async def verify(host: VirtHost, roots: StorageRoots, ctx: TaskContext, work: Work) -> list[dict[str, Any]]:
    expected = {d.target: work.dst_source(d) for d in work.plan.disks}
    live = parse_disks(await host.live_xml(ctx.vm_uuid))
    for disk in live:
        if disk.target in expected and disk.location != expected[disk.target].location:
            raise MigrationFailed(
                f"after the switch {disk.target} uses {disk.location}, not {expected[disk.target].location}",
                code=Code.VERIFY_FAILED,
            )
    if await host.is_persistent(ctx.vm_uuid):
        inactive = await host.inactive_xml(ctx.vm_uuid)
        await host.define_xml(rewrite_disk_sources(inactive, expected))
        for disk in parse_disks(await host.inactive_xml(ctx.vm_uuid)):
            if disk.target in expected and disk.location != expected[disk.target].location:
                raise MigrationFailed(
                    f"the persistent definition still points {disk.target} at {disk.location}",
                    code=Code.VERIFY_FAILED,
                )
    for moved in work.plan.disks:
        total = work.mirrors[moved.target].total
        if moved.dst_kind is StorageKind.RBD and moved.lower_layers:
            await _check_snapshots(work, moved)
        if moved.dst_kind is not StorageKind.FILE:
            # One raw volume (a device, an image): no chain to read; libvirt's XML above is the check.
            ctx.progress(f"disk:{moved.target}", total, total)
            continue
        chain = await qemuimg.backing_chain(moved.dst_top, moved.dst_format)
        want = 1 if moved.flatten else len(moved.src_chain)
        if moved.precreated:  # below a pre-created top the chain is the caller's
            want = 1 if moved.flatten else len(chain)
        owned = chain[:1] if moved.precreated else chain[:want]
        if len(chain) != want or any(not roots.owner_of_location(layer.path) for layer in owned):
            raise MigrationFailed(
                f"the chain of {moved.target} at the destination is not as planned",
                code=Code.VERIFY_FAILED,
                details=" <- ".join(layer.path for layer in chain),
            )
        ctx.progress(f"disk:{moved.target}", total, total)
    return await volume_inventory(live, work.plan, roots)


async def _check_snapshots(work: Work, disk: DiskPlan) -> None:
    """The image keeps the disk's lower layers as its snapshots, oldest first, as planned."""
    pool = work.dst
    assert isinstance(pool, RbdPool)
    want = [layer.dst.rsplit("@", 1)[1] for layer in disk.lower_layers]
    async with keyed(pool, "keeping a chain as RBD snapshots") as key:
        have = await key.snapshots(parse_rbd(disk.dst_top, "volumes"))
    if have[: len(want)] != want:
        raise MigrationFailed(
            f"{disk.dst_top} does not keep the snapshots planned",
            code=Code.VERIFY_FAILED,
            details=f"planned {', '.join(want)}; found {', '.join(have) or 'none'}",
        )


async def carry_snapshots(host: VirtHost, ctx: TaskContext, plan: MigrationPlan) -> None:
    """Point libvirt's snapshot metadata at the moved files (``agent.migration.snapshots``), so that
    snapshot-list and a revert use the new storage. The VM already runs there: a failure is reported,
    not fatal."""
    try:
        metas = await host.call_domain(ctx.vm_uuid, snapshots.read_snapshots)
        if not metas:
            return
        moved = {layer.src: layer.dst for layer in plan.layers}
        moved.update({d.src_top: d.dst_top for d in plan.disks})
        rewritten = [
            snapshots.SnapshotMeta(m.name, snapshots.rewrite_snapshot(m.xml, moved), m.current) for m in metas
        ]
        await host.call_domain(ctx.vm_uuid, lambda dom: snapshots.redefine_snapshots(dom, rewritten))
    except AgentError as err:
        ctx.log.error("snapshot metadata not rewritten: %s", err.description)
        ctx.note("snapshots", {"error": err.description})
        return
    ctx.log.info("snapshot metadata rewritten to the new paths: %s", ", ".join(m.name for m in metas))
    ctx.note(
        "snapshots",
        {"carried": [m.name for m in metas], "current": next((m.name for m in metas if m.current), None)},
    )
