"""Calls to the destination agent that must outlive a restart or a cut link: retried while it cannot be
reached; its other answers, errors included, are final."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agent.errors import AgentError, Code, MigrationFailed, NotFound
from agent.migration.engine import TaskContext
from agent.migration.peer.client import DestinationAgent
from agent.virt.host import UNREACHABLE

T = TypeVar("T")

#: How long to keep asking an unreachable destination agent to clean up after a failure.
ABORT_RETRY_S = 180.0
#: How long to keep asking an unreachable destination agent to confirm a migration that the hypervisors
#: already show as done; past it the task succeeds with ``destinationAgent: unconfirmed`` and the destination
#: agent commits its record itself when it starts again (``IncomingService.reconcile``).
COMMIT_RETRY_S = 45.0

_PEER_RETRY_CODES: dict[str, str] = {
    Code.PEER_UNREACHABLE: "agent unreachable",
    UNREACHABLE: "agent cannot reach its libvirtd",
}


async def retrying(
    ctx: TaskContext, what: str, call: Callable[[], Awaitable[T]], *, within_s: float = ABORT_RETRY_S
) -> T:
    """A ``DestinationAgent`` call (``what`` for the log), retried for up to ``within_s`` while the
    destination agent cannot be reached
    (restarting, a cut link healing) or cannot reach its own libvirtd (restarting: without it the agent
    cannot tell whether the VM runs there, so it must not remove files yet); its other answers, errors
    included, are final."""
    delay = 1.0
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except MigrationFailed as err:
            if err.code not in _PEER_RETRY_CODES or time.monotonic() > deadline:
                raise
            ctx.log.warning(
                "destination %s (%s); retrying in %.0f s", _PEER_RETRY_CODES[err.code], what, delay
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def confirm(ctx: TaskContext, peer: DestinationAgent) -> bool:
    """Have the destination agent commit its record; False (and a note) when it cannot be reached in
    ``COMMIT_RETRY_S`` or refuses: the VM's place is already known, so that never fails the task."""
    try:
        await retrying(ctx, "commit", lambda: peer.commit(ctx.task_uuid), within_s=COMMIT_RETRY_S)
    except NotFound:
        # Committed by an earlier life of this task, or by the destination agent's own reconciliation
        # at its start: the record is gone, the VM's disks decide.
        ctx.log.info("the destination had already committed this migration")
    except AgentError as err:
        ctx.log.warning(
            "the VM runs on the destination, but its agent did not confirm (%s); it commits its record "
            "when it starts again",
            err.description,
        )
        ctx.note("destinationAgent", f"unconfirmed: {err.description}")
        return False
    return True


async def abort_remote(ctx: TaskContext, peer: DestinationAgent) -> None:
    """Have the destination remove what it prepared; retried while it cannot be reached (a cut link
    heals, a restarting agent comes back), and shielded from the cancel that brought us here."""

    async def _abort() -> None:
        try:
            await retrying(ctx, "abort", lambda: peer.abort(ctx.task_uuid))
        except AgentError as err:
            ctx.log.error("the destination agent could not clean up: %s", err.description)
            ctx.note("destinationCleanup", f"failed: {err.description}")

    await asyncio.shield(_abort())
