"""The engine skeleton's runner: the one place that owns a task's deadline and decides its verdict.

Engines (same host, cross host, offline) supply the steps of a move and say where the VM ended up: they
return the inventory once the VM runs from its new volumes, raise ``AgentError`` when it runs on from its
source volumes (or its place is unknown: ``AGENT.VM_LOCATION_UNKNOWN``), and on ``CancelledError`` undo what
they did unless the switch already happened. None of them keeps a timeout of its own. The runner:
- enforces the task's one deadline (``TaskContext.deadline``: ``timeout`` seconds after the task was created,
  in wall-clock time, so an agent restarted mid-task keeps the same deadline) by cancelling the engine when
  it passes; the engine then undoes its work like for a cancel, and the runner ends the task FAILED
  ``AGENT.TIMEOUT`` with the engine's explanation (``Engine.explain_deadline``, e.g. the convergence
  figures); an engine that finds the VM already switched over returns its inventory, and the task succeeds
  with a ``deadlinePassed`` note (the truth beats the clock);
- maps every ending to one ``Verdict`` (SUCCEEDED with the inventory, FAILED with an error code, CANCELLED)
  that the task manager records, journals and reports: the API, the final callback and the ZStack dialect
  all read that one record.
A stopping agent (``ctx.detaching``) is not an ending: the cancel propagates and the task stays unfinished
in the journal for the next start.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError, Code, MigrationFailed
from agent.migration.engine import Engine, TaskContext
from agent.migration.states import TaskState

log = logging.getLogger(__name__)


CANCELLED_DESCRIPTION = "the migration was cancelled on request; the VM keeps its source volumes"


@dataclass(frozen=True)
class Verdict:
    """How a task ended: what the manager records and every report repeats."""

    state: TaskState
    detail: str | None = None  # a short word for the state's log line (the error code, "cancelled", ...)
    error: AgentError | None = None
    inventory: list[dict[str, Any]] | None = None

    @classmethod
    def succeeded(cls, inventory: list[dict[str, Any]]) -> Verdict:
        return cls(TaskState.SUCCEEDED, None, None, inventory)

    @classmethod
    def failed(cls, error: AgentError) -> Verdict:
        return cls(TaskState.FAILED, error.code, error)

    @classmethod
    def cancelled(cls) -> Verdict:
        return cls(TaskState.CANCELLED, "cancelled", AgentError(CANCELLED_DESCRIPTION, code=Code.CANCELLED))


async def run(engine: Engine, ctx: TaskContext) -> Verdict:
    """Run the engine to its end under the task's deadline and decide the verdict."""
    deadline = ctx.deadline
    try:
        async with asyncio.timeout(None if deadline is None else deadline.remaining()):
            inventory = await engine.run(ctx)
    except TimeoutError as err:
        # The deadline's own expiry, or an engine's wait that leaked its TimeoutError (1 s of slack: the
        # deadline is wall-clock time, the timer the loop's monotonic clock).
        if deadline is None or deadline.remaining() > 1.0:
            ctx.log.exception("the migration engine raised an unexpected TimeoutError")
            return Verdict.failed(AgentError("internal error in the migration engine", details=repr(err)))
        return Verdict.failed(_timed_out(engine, ctx, err))
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if ctx.detaching or (current is not None and current.cancelling() and not ctx.cancel_requested):
            raise  # the agent stops: not an ending
        if ctx.cancel_requested:
            return Verdict.cancelled()
        return Verdict.failed(MigrationFailed("the engine stopped with an unexpected cancel"))
    except AgentError as err:
        return Verdict.failed(err)
    except Exception as err:
        ctx.log.exception("the migration engine raised an unexpected error")
        internal = AgentError(
            "internal error in the migration engine", details=f"{type(err).__name__}: {err}"
        )
        internal.__cause__ = err
        return Verdict.failed(internal)
    if deadline is not None and deadline.passed():
        ctx.note("deadlinePassed", "the task's timeout passed after the switch; the move completed")
    return Verdict.succeeded(inventory if isinstance(inventory, list) else [])


def _timed_out(engine: Engine, ctx: TaskContext, err: TimeoutError) -> MigrationFailed:
    timeout = ctx.request.timeout
    explain = getattr(engine, "explain_deadline", None)
    reason: tuple[str, dict[str, Any]] | None = explain() if callable(explain) else None
    error = MigrationFailed(
        f"the migration did not finish within the task timeout of {timeout:g} s"
        + (f" ({reason[0]})" if reason else "")
        + "; it was stopped and the VM keeps running from its source volumes",
        code=Code.TIMEOUT,
        details="raise the timeout or the bandwidth, or lower the guest's load",
    )
    if reason and reason[1]:
        error.extra["figures"] = reason[1]
    error.__cause__ = err
    return error
