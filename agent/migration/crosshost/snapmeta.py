"""libvirt's snapshot metadata beside a cross-host migration: libvirt 9.0 will not migrate a domain that has
any, so it is journalled, taken off this host before the migration (``Migration.run``) and, once the VM's
place is known, redefined where the VM runs: on the destination rewritten to the new paths, or back here.
Both are idempotent (``VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE`` replaces a snapshot's metadata), so a resumed
task or a settled failure may do them again: the journalled XML is never lost to a restart."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from agent.errors import AgentError
from agent.migration import snapshots
from agent.migration.engine import TaskContext
from agent.migration.peer.wire import Prepared
from agent.migration.plan import MigrationPlan
from agent.virt.host import VirtHost


async def put_back_here(host: VirtHost, ctx: TaskContext, metas: Sequence[snapshots.SnapshotMeta]) -> None:
    """The VM stayed on this host: its snapshot metadata is defined here again (as it was)."""
    if not metas:
        return
    with contextlib.suppress(AgentError):  # the VM is gone from here only if it switched over
        await host.call_domain(ctx.vm_uuid, lambda dom: snapshots.redefine_snapshots(dom, metas))
        ctx.log.info("snapshot metadata put back on this host: %s", ", ".join(m.name for m in metas))


async def carry_to_destination(
    ctx: TaskContext,
    plan: MigrationPlan,
    prepared: Prepared,
    metas: Sequence[snapshots.SnapshotMeta],
) -> None:
    """The VM runs on the destination: redefine its snapshots there, rewritten to the new paths. A failure is
    reported (the XML stays in the journal and in the task's details), not fatal: the move itself is done."""
    if not metas:
        return
    moved: dict[str, str] = {}
    for disk in plan.disks:
        top = prepared.disk(disk.target).top
        moved[disk.src_top] = top
        for layer in disk.src_chain[1:]:  # lower layers keep their file names next to the top
            moved[layer] = os.path.join(os.path.dirname(top), os.path.basename(layer))
    rewritten = [
        snapshots.SnapshotMeta(m.name, snapshots.rewrite_snapshot(m.xml, moved), m.current) for m in metas
    ]
    try:
        remote = await VirtHost.open(prepared.libvirtUri)
        try:
            await remote.call_domain(ctx.vm_uuid, lambda dom: snapshots.redefine_snapshots(dom, rewritten))
        finally:
            await remote.close()
    except AgentError as err:
        ctx.log.error("snapshot metadata not redefined on the destination: %s", err.description)
        ctx.note("snapshots", {"error": err.description, "xml": [m.to_dict() for m in rewritten]})
        return
    ctx.log.info("snapshot metadata carried to the destination: %s", ", ".join(m.name for m in metas))
    ctx.note(
        "snapshots",
        {"carried": [m.name for m in metas], "current": next((m.name for m in metas if m.current), None)},
    )
