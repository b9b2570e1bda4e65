"""The contract between the task engine (``agent.tasks``) and the migration engines.

The task manager builds a ``TaskContext`` for each task and calls ``engine.run(ctx)``. The engine:
- announces each state with ``await ctx.enter(state)`` (journalled before it returns, so call it *before*
  the step it names);
- records engine-private resume data with ``await ctx.checkpoint(data)`` before any step that cannot be
  undone (``ctx.resume_data`` holds the last one when the agent restarted mid-task);
- reports bytes per item with ``ctx.progress(item, done, total)``; items are volumes or ``"memory"``;
- reads ``ctx.bandwidth`` / ``ctx.downtime_ms`` whenever it decides, and may ``await ctx.tuning_changed()``
  to be woken by a PATCH; while its streams run it attaches their ``LiveLimits`` (``ctx.attach_limits``),
  through which a PATCH applies at once and answers with what QEMU then reports (``agent.migration.limits``);
- returns the inventory (``list[VolumeInventory]`` as dicts) on success, raises ``AgentError`` on failure;
  on ``asyncio.CancelledError`` it undoes what it did (the VM keeps its source volumes) and re-raises,
  except when ``ctx.detaching`` is True: the agent is stopping, so it leaves running libvirt jobs alone,
  undoes nothing and re-raises; the task stays unfinished in the journal and comes back with ``resume=True``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agent.errors import Conflict
from agent.migration.request import MigrationRequest
from agent.migration.states import TaskState

if TYPE_CHECKING:
    from agent.migration.limits import LiveLimits

T = TypeVar("T")

#: How often a live engine reads its jobs and steers them (progress, pacing, convergence).
TICK_S = 0.25


@dataclass(frozen=True)
class Deadline:
    """The task's one deadline, in wall-clock seconds (``time.time()``): ``timeout`` seconds after the task
    was created, so a restarted agent keeps it. Enforced by the runner (``agent.migration.runner``) only;
    engines and the convergence controller may read it to plan, never to end a task."""

    at: float

    def remaining(self) -> float:
        return max(0.0, self.at - time.time())

    def passed(self) -> bool:
        return time.time() >= self.at


class Step(enum.StrEnum):
    """The engines' checkpoint steps, as journalled (``ctx.checkpoint({"step": ...})``): the last one taken
    tells a restarted agent where to resume. The values are the journal's wire form; never rename one."""

    # both engines
    PREPARED = "prepared"
    # same host
    COPYING_LAYERS = "copying-layers"
    CREATING_TOPS = "creating-tops"
    MIRRORING = "mirroring"
    SWITCHING = "switching"
    VERIFYING = "verifying"
    # cross host
    PREPARING = "preparing"
    MIGRATING = "migrating"
    COMMITTING = "committing"


class TaskContext(Protocol):
    task_uuid: str
    vm_uuid: str
    request: MigrationRequest
    log: logging.LoggerAdapter[logging.Logger]

    @property
    def resume_data(self) -> Mapping[str, Any] | None: ...

    @property
    def bandwidth(self) -> int | None:
        """The task's whole budget in bytes/s (None: uncapped), current value."""

    @property
    def host_share(self) -> int | None:
        """The task's share of the host-wide budget in bytes/s (None: no host budget), current value; its
        streams run at the smaller of this and ``bandwidth`` (``budget_of``)."""

    @property
    def downtime_ms(self) -> int: ...

    @property
    def deadline(self) -> Deadline | None:
        """The task's one deadline (None: no timeout); see ``Deadline``."""

    @property
    def detaching(self) -> bool:
        """True while the agent stops (see the module docstring): a cancel then means "let go", not "undo"."""

    @property
    def cancel_requested(self) -> bool:
        """True once the user asked to cancel; a resumed engine that sees it undoes what it finds."""

    async def enter(self, state: TaskState, detail: str | None = None) -> None: ...

    async def checkpoint(self, data: Mapping[str, Any]) -> None: ...

    def progress(self, item: str, done: int, total: int) -> None: ...

    def note(self, key: str, value: Any) -> None:
        """Attach a fact to the task's public view (``details``): measured downtime, decisions, plan."""

    async def tuning_changed(self) -> None:
        """Return when a PATCH changed bandwidth or downtime."""

    def attach_limits(self, limits: LiveLimits | None) -> None:
        """The running streams' ``LiveLimits`` (None: they ended); a PATCH goes through it."""


def budget_of(ctx: TaskContext) -> int | None:
    """What a task's streams start at: the smaller of its own bandwidth and its host share (None: neither);
    once they run, their ``LiveLimits`` keep it (``LiveLimits.budget``)."""
    given = [b for b in (ctx.bandwidth, ctx.host_share) if b]
    return min(given) if given else None


class Engine(Protocol):
    """An engine supplies a move's steps; the runner decides how the task ends. An engine may also offer
    ``explain_deadline() -> (message, figures) | None``: why it had not finished when the deadline passed."""

    name: str

    async def run(self, ctx: TaskContext) -> list[dict[str, Any]]: ...


async def announce(ctx: TaskContext, state: TaskState) -> None:
    """``ctx.enter(state)`` unless a cancel is under way: a CANCELLING task admits only a final state, and
    past the point of no return the engine finishes the move and reports it (the cancel lost the race)."""
    if ctx.cancel_requested:
        return
    try:
        await ctx.enter(state)
    except Conflict:  # the cancel was journalled between the check and the transition
        if not ctx.cancel_requested:
            raise


async def run_past_cancel(ctx: TaskContext, steps: Awaitable[T]) -> T:
    """Run the steps after the point of no return (pivots done or begun, the VM arrived on the destination)
    to their end even when a cancel arrives: undoing them is impossible, stopping halfway would leave the
    live and persistent definitions disagreeing. The task then ends with the truth and a ``cancelTooLate``
    note. Errors of the steps themselves propagate."""
    inner = asyncio.ensure_future(steps)
    absorbed = 0
    while True:
        try:
            result = await asyncio.shield(inner)
            break
        except asyncio.CancelledError:
            if inner.cancelled():
                raise
            absorbed += 1
            ctx.log.warning("cancel arrived past the point of no return; finishing the move instead")
    task = asyncio.current_task()
    if absorbed and task is not None:
        for _ in range(absorbed):
            task.uncancel()
    if absorbed and ctx.cancel_requested:
        ctx.note("cancelTooLate", "the cancel arrived after the switch had begun; the move completed")
    return result


#: Makes the engine for a task: (request, VM uuid, resumed after a restart) -> engine. The agent's is
#: ``migration.factory.make_engine_factory``; tests pass their own.
EngineFactory = Callable[[MigrationRequest, str, bool], Engine]
