"""After the switch: check with the hypervisors that the VM runs on the destination from the planned tops,
then have the destination agent forget its record (``destination.confirm``)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from agent.errors import AgentError, Code, MigrationFailed, NotFound
from agent.migration.crosshost.destination import COMMIT_RETRY_S, confirm, retrying
from agent.migration.engine import TaskContext, announce
from agent.migration.inventory import planned_inventory, remote_inventory
from agent.migration.peer.client import DestinationAgent
from agent.migration.peer.wire import Prepared
from agent.migration.plan import MigrationPlan
from agent.migration.states import TaskState
from agent.virt.host import VirtHost
from agent.virt.peer import PeerDomain, look_at_peer
from agent.virt.states import DomainState


async def commit(
    host: VirtHost,
    ctx: TaskContext,
    peer: DestinationAgent,
    plan: MigrationPlan,
    prepared: Prepared,
    stats: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """The VM switched over: verify it runs on the destination from the planned tops, asking the
    hypervisors themselves, then have the destination agent forget its record. ``stats`` is the completed
    job's statistics when libvirt's migration call returned success, None when the arrival was found by
    looking (after an error, a cancel or a restart)."""
    await announce(ctx, TaskState.SWITCHING)
    downtime = (stats or {}).get("downtime")
    if downtime is not None:
        ctx.note("downtimeMs", int(downtime))
        if int(downtime) > ctx.downtime_ms:
            ctx.note(
                "downtimeExceeded",
                f"measured downtime {int(downtime)} ms exceeded the requested {ctx.downtime_ms} ms",
            )
    await announce(ctx, TaskState.VERIFYING)
    tops = prepared.tops()
    await host.wait_reachable()
    try:
        still_here = await host.domain_state(ctx.vm_uuid)
    except NotFound:
        still_here = None
    if still_here not in (None, DomainState.SHUTOFF):
        raise MigrationFailed(
            f"VM {ctx.vm_uuid} still runs on this host after the migration", code=Code.VERIFY_FAILED
        )
    view = await look_at_peer(prepared.libvirtUri, ctx.vm_uuid)
    if view is not None and not view.runs_from(tops):
        raise _not_as_planned(ctx, view, tops)
    confirmed = await confirm(ctx, peer)
    vm: Mapping[str, Any] | None = None
    if confirmed:
        with contextlib.suppress(AgentError):
            vm = await retrying(ctx, "VM look-up", lambda: peer.vm(ctx.task_uuid), within_s=COMMIT_RETRY_S)
    if view is None:
        # The destination libvirtd did not answer: its agent's view, or libvirt's own success, decides.
        if vm is not None:
            agent_tops = {d.get("target"): (d.get("chain") or [{}])[0].get("path") for d in vm["disks"]}
            for target, top in tops.items():
                if agent_tops.get(target) != top:
                    raise MigrationFailed(
                        f"on the destination {target} uses {agent_tops.get(target)}, not {top}",
                        code=Code.VERIFY_FAILED,
                        details="the VM runs on the destination; nothing was removed on either host",
                    )
        elif stats is None:
            raise MigrationFailed(
                f"cannot confirm that VM {ctx.vm_uuid} runs on the destination",
                code=Code.VM_LOCATION_UNKNOWN,
                details="the VM left this host, but neither the destination's libvirtd nor its agent "
                "answered; nothing was removed on either host: check the destination before retrying",
            )
        else:
            ctx.note(
                "destinationLibvirt", "unreachable after the switch; libvirt reported the migration done"
            )
    if vm is not None:
        return remote_inventory(vm, plan)
    return planned_inventory(plan, prepared)


def _not_as_planned(ctx: TaskContext, view: PeerDomain, tops: Mapping[str, str]) -> MigrationFailed:
    """The destination libvirtd shows the VM, but not running from the planned tops."""
    return MigrationFailed(
        f"VM {ctx.vm_uuid} is {view.state} on the destination, not running from the planned volumes",
        code=Code.VERIFY_FAILED,
        details="planned: "
        + ", ".join(f"{t}={p}" for t, p in tops.items())
        + "; live there: "
        + (", ".join(f"{t}={p}" for t, p in view.live_tops.items()) or "none")
        + "; nothing was removed on either host",
    )
