"""When libvirt's migration job ended without a clean success (an error, an abort, the deadline, a cancel,
a restart): where the VM runs decides the task (the skeleton's rule, ``placement.place_of``), asked of the
hypervisors first and of the destination agent only when its libvirtd is silent."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import libvirt

from agent.errors import AgentError, Code, MigrationFailed, NotFound
from agent.migration import placement
from agent.migration.crosshost import snapmeta
from agent.migration.crosshost.commit import commit
from agent.migration.crosshost.destination import abort_remote, retrying
from agent.migration.crosshost.work import CrossHostWork
from agent.migration.engine import Step, TaskContext, run_past_cancel
from agent.migration.peer.client import DestinationAgent
from agent.migration.peer.wire import Prepared
from agent.virt.host import VirtHost
from agent.virt.peer import describe, look_at_peer
from agent.virt.states import DomainState

#: How long to keep asking the destination libvirtd where the VM is before asking its agent instead.
PEER_LIBVIRT_WAIT_S = 30.0


async def settle(
    host: VirtHost,
    ctx: TaskContext,
    peer: DestinationAgent,
    work: CrossHostWork,
    failure: BaseException,
    *,
    wedged: bool,
) -> list[dict[str, Any]]:
    """Make the task tell the truth. The VM on the destination: commit, the task succeeds (a cancel lost
    the race). On this host: the destination removes what it prepared and ``failure`` is raised. Unknown
    (this libvirtd and the destination agent both silent): nothing is removed, the task says so.
    ``wedged``: the migration job did not end after its abort, so its end is not waited for again."""
    if isinstance(failure, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the cancel is answered below (CANCELLED after cleanup, or the truth)
    # Deciding and cleaning up must not be cut short by a (further) cancel: it would leave the
    # destination's files behind or a moved VM reported as cancelled.
    return await run_past_cancel(ctx, _settle_steps(host, ctx, peer, work, failure, wedged=wedged))


async def _settle_steps(
    host: VirtHost,
    ctx: TaskContext,
    peer: DestinationAgent,
    work: CrossHostWork,
    failure: BaseException,
    *,
    wedged: bool,
) -> list[dict[str, Any]]:
    plan, prepared = work.plan, work.destination
    where, here = await locate(host, ctx, peer, prepared, wedged=wedged)
    settlement = placement.settle(where)
    if settlement is placement.Settlement.COMMIT:
        if isinstance(failure, asyncio.CancelledError) and ctx.cancel_requested:
            ctx.log.warning("the cancel came after the switchover; the VM runs on the destination")
            ctx.note("cancelTooLate", "the cancel arrived after the switchover; the move completed")
        elif isinstance(failure, asyncio.CancelledError):
            ctx.log.warning("the deadline passed after the switchover; the VM runs on the destination")
        elif isinstance(failure, AgentError) and failure.code is Code.INTERRUPTED:
            # A resumed task whose migration ended while the agent was away: nothing went wrong.
            ctx.log.info(
                "the migration finished while the agent was restarting; the VM runs on the destination"
            )
        else:
            ctx.log.warning("%s, but the VM runs on the destination; committing", _what(failure))
        await work.checkpoint(ctx, Step.COMMITTING)
        await snapmeta.carry_to_destination(ctx, plan, prepared, work.snapshots)
        return await commit(host, ctx, peer, plan, prepared, None)
    if settlement is placement.Settlement.KEEP_ALL:
        raise MigrationFailed(
            f"cannot tell where VM {ctx.vm_uuid} runs after the migration ended ({_what(failure)})",
            code=Code.VM_LOCATION_UNKNOWN,
            details=(
                "neither this host's libvirtd nor the destination's libvirtd or agent could tell; "
                "nothing was removed on either host: check both before retrying. Source volumes: "
                + ", ".join(f"{d.target}={d.src_top}" for d in plan.disks)
                + "; destination volumes: "
                + ", ".join(f"{t}={p}" for t, p in prepared.tops().items())
            ),
        ) from failure
    await snapmeta.put_back_here(host, ctx, work.snapshots)
    await abort_remote(ctx, peer)
    # Looked at again after the clean-up: a QEMU that resumed the guest after a failed switchover can die
    # a moment later (QEMU 7.2: "bdrv_co_write_req_prepare: Assertion ... BDRV_O_INACTIVE" when the link
    # broke during the switchover, seen in the lab), and the verdict must say where the VM is now.
    here = await _state_here(host, ctx, here)
    if here in (DomainState.SHUTOFF, DomainState.CRASHED) and not isinstance(failure, asyncio.CancelledError):
        raise MigrationFailed(
            f"VM {ctx.vm_uuid} was shut down during the migration (now {here})",
            code=Code.VM_STOPPED,
            details="the migration was abandoned and the destination cleaned up; the VM stays "
            "defined on this host with its source volumes",
        ) from failure
    raise failure


async def job_active(host: VirtHost, ctx: TaskContext) -> bool:
    """Whether libvirt still has a job on the VM here (the migration, or its recovery)."""
    try:
        stats = await host.job_stats(ctx.vm_uuid)
    except (NotFound, AgentError):
        return False
    return bool(int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) != libvirt.VIR_DOMAIN_JOB_NONE)


async def locate(
    host: VirtHost, ctx: TaskContext, peer: DestinationAgent, prepared: Prepared, *, wedged: bool
) -> tuple[placement.Place, DomainState | None]:
    """Where the VM is once libvirt's job is over (the skeleton's rule, ``placement.place_of``), and its
    state on this host (None: libvirtd did not answer). Asked of the hypervisors first: this host's
    libvirtd and the destination's (the one the migration went to); the destination agent only when
    that libvirtd is silent.

    While a pre-copy migration runs, the incoming domain on the destination is *paused*: only a running
    domain there (or one defined there while this host has none) means the VM arrived. After a
    libvirtd restart here, its recovery first ends an interrupted outgoing migration (libvirt 9.0:
    cancelled, the VM resumed on this host), so wait for the job to be gone before looking.
    """
    local: DomainState | None = None
    if await host.wait_reachable():
        deadline = time.monotonic() + (0 if wedged else 60)
        while time.monotonic() < deadline:
            if not await job_active(host, ctx):
                break
            await asyncio.sleep(0.5)
        try:
            local = await host.domain_state(ctx.vm_uuid)
        except NotFound:
            local = DomainState.UNDEFINED
        except AgentError:
            local = None
    remote = await _remote_state(ctx, peer, prepared)
    ctx.log.info("the migration job is over: the VM is %s here, %s on the destination", local, remote)
    return placement.place_of(local, remote), local


async def _remote_state(ctx: TaskContext, peer: DestinationAgent, prepared: Prepared) -> DomainState | None:
    """The VM's state on the destination: its libvirtd's word (waited for while it restarts), else its
    agent's; None when neither answers."""
    # A libvirtd that is merely restarting answers again within seconds.
    deadline = time.monotonic() + PEER_LIBVIRT_WAIT_S
    while (view := await look_at_peer(prepared.libvirtUri, ctx.vm_uuid)) is None:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(2)
    if view is not None:
        return view.state
    ctx.log.warning("the destination libvirtd is %s; asking the destination agent", describe(view))
    try:
        vm = await retrying(ctx, "VM look-up", lambda: peer.vm(ctx.task_uuid))
        return DomainState.of(vm.get("state"))
    except NotFound:
        return DomainState.UNDEFINED
    except AgentError:
        return None


async def _state_here(host: VirtHost, ctx: TaskContext, before: DomainState | None) -> DomainState | None:
    """The VM's state on this host now (``before`` when libvirtd does not answer)."""
    try:
        now = await host.domain_state(ctx.vm_uuid)
    except NotFound:
        return DomainState.UNDEFINED
    except AgentError:
        return before
    if now != before:
        ctx.log.warning("the VM's state here changed while the migration was settled: %s -> %s", before, now)
    return now


def _what(failure: BaseException) -> str:
    if isinstance(failure, AgentError):
        return failure.description
    return type(failure).__name__
