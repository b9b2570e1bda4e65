"""After an agent restart: a migration that libvirt still runs (peer to peer, the source libvirtd owns it)
is steered to its end and settled; one interrupted earlier is cleaned up on the destination and fails."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import AgentError, Code, MigrationFailed
from agent.migration import convergence
from agent.migration.crosshost.destination import abort_remote
from agent.migration.crosshost.params import policy_of
from agent.migration.crosshost.settle import job_active, settle
from agent.migration.crosshost.steering import Steering, disk_aliases
from agent.migration.crosshost.work import CrossHostWork
from agent.migration.engine import Step, TaskContext
from agent.migration.mirrors.speeds import AllocationIndex
from agent.migration.peer.client import DestinationAgent
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.migration.volumes import source_index
from agent.virt.host import VirtHost


async def resume(
    host: VirtHost,
    ctx: TaskContext,
    peer: DestinationAgent,
    data: Mapping[str, Any],
    *,
    tick_s: float,
    wedged: set[str],
    on_steering: Callable[[Steering], None],
) -> list[dict[str, Any]]:
    """By the step journalled last. ``migrating`` / ``committing``: the peer-to-peer migration may still run:
    it is steered to its end (aborted first if a cancel was journalled), then where the VM runs decides
    (``settle``): commit and succeed, or clean the destination and fail. Earlier steps (preparing, sending
    lower layers): the destination is cleaned up and the task fails (``AGENT.INTERRUPTED``; the management
    plane sends the request again)."""
    work = CrossHostWork.from_checkpoint(data)
    plan, step = work.plan, work.step
    ctx.log.info("resuming cross-host migration at step %s", step)
    interrupted = MigrationFailed(
        f"the agent restarted during step {step!r}; the destination was cleaned up and the VM stays on "
        "this host",
        code=Code.INTERRUPTED,
        details="send the request again to retry",
    )

    async def settled(failure: BaseException) -> list[dict[str, Any]]:
        return await settle(host, ctx, peer, work, failure, wedged=ctx.vm_uuid in wedged)

    if step in (Step.MIGRATING, Step.COMMITTING):
        try:
            await host.wait_reachable()
            if ctx.cancel_requested:
                await _abort_job_if_active(host, ctx)
            verdict = await _watch_running(host, ctx, plan, tick_s=tick_s, on_steering=on_steering)
        except asyncio.CancelledError as err:
            if ctx.detaching:
                raise
            # Cancelled now (or journalled before the restart): abort the job unless it switched over.
            await asyncio.shield(_abort_job_if_active(host, ctx))
            return await settled(err)
        if ctx.cancel_requested:  # aborted above, or it had ended: where the VM is decides
            return await settled(asyncio.CancelledError())
        return await settled(verdict or interrupted)
    await abort_remote(ctx, peer)
    if ctx.cancel_requested:  # journalled before the restart: the task ends CANCELLED, cleaned up
        raise asyncio.CancelledError()
    raise interrupted


async def _abort_job_if_active(host: VirtHost, ctx: TaskContext) -> None:
    with contextlib.suppress(AgentError):
        if await job_active(host, ctx):
            await host.abort_job(ctx.vm_uuid)


async def _take_over(host: VirtHost, ctx: TaskContext, steer: Steering) -> None:
    """The controller carries on from the downtime and throttle QEMU runs with. A fresh controller's
    ``start`` would set the initial downtime again in the middle of the migration (issue 21: a change of
    ours that the running migration did not ask for), so a resumed one is never started."""
    stats: dict[str, Any] = {}
    downtime: int | None = None
    with contextlib.suppress(AgentError):
        stats = await host.job_stats(ctx.vm_uuid)
    with contextlib.suppress(AgentError):
        downtime = await host.max_downtime(ctx.vm_uuid)
    sample = convergence.MigrationSample.from_job_stats(stats, time.monotonic())
    for action in steer.controller.resume(sample, downtime):
        if isinstance(action, convergence.Note):
            ctx.log.info("convergence: %s %s", action.message, action.figures)
            steer.decisions.append({"message": action.message, **dict(action.figures)})
            ctx.note("decisions", steer.decisions[-20:])


async def _watch_running(
    host: VirtHost,
    ctx: TaskContext,
    plan: MigrationPlan,
    *,
    tick_s: float,
    on_steering: Callable[[Steering], None],
) -> AgentError | None:
    """Keep steering a migration this agent did not start in this life (it survived a restart) until
    libvirt ends it; returns the reason if the steering had to abort it."""
    policy = policy_of(ctx)
    aliases: dict[str, str] = {}
    with contextlib.suppress(AgentError):  # without them the mirrors are named by target (drive-vda)
        aliases = await disk_aliases(host, ctx.vm_uuid)
    steer = Steering(
        host,
        ctx,
        plan,
        {d.target: await _index(host, ctx, d) for d in plan.disks},
        convergence.ConvergenceController(policy),
        aliases=aliases,
        tick_s=tick_s,
    )
    on_steering(steer)
    await _take_over(host, ctx, steer)
    try:
        while await job_active(host, ctx):
            try:
                await steer.tick()
            except AgentError as err:
                ctx.log.debug("steering step skipped: %s", err.description)
            await asyncio.sleep(tick_s)
    finally:
        await steer.close()
    return steer.verdict


async def _index(host: VirtHost, ctx: TaskContext, disk: DiskPlan) -> AllocationIndex:
    """Where the disk's data is, for the resumed steering; an RBD image whose QEMU cannot be asked now (the
    domain switching over) counts whole: its mirror is then paced as all data, never faster."""
    try:
        return await source_index(host, ctx.vm_uuid, disk)
    except AgentError as err:
        ctx.log.info("disk %s: no allocation map (%s); counted whole", disk.target, err.description)
        return AllocationIndex([(0, disk.virtual_size)])
