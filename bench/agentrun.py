"""Driving the lab's real agents: a migration request, its task followed to the end with progress samples,
and the final callback received on the lab bridge by labkit's ``CallbackRecorder`` (the agent's "request to
final callback" time)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.client import AgentUnreachable, ApiError
from bench.labenv import BenchError, Disturbed, Host, Lab, daemon_pids, restarted
from labkit.agents import agent_client
from labkit.mgmtplane import CallbackRecorder

log = logging.getLogger(__name__)

FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class TaskRun:
    """One migration through the agent: times (monotonic), the final view and the progress samples."""

    task_uuid: str
    started: float  # just before the request was sent
    started_wall: float  # the same moment on the wall clock (the task's state timestamps use it)
    view: dict[str, Any] = field(default_factory=dict)
    ended: float | None = None  # when a poll first saw the final state
    callback_at: float | None = None
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    disturbed: str | None = None  # why the run says nothing about performance (an agent restarted ...)

    @property
    def state(self) -> str:
        return str(self.view.get("state", "UNKNOWN"))

    @property
    def succeeded(self) -> bool:
        return self.state == "SUCCEEDED"

    @property
    def elapsed(self) -> float | None:
        """Request to final callback (to the final state seen by polling when there was no callback)."""
        end = self.callback_at if self.callback_at is not None else self.ended
        return None if end is None else end - self.started

    def state_times(self) -> dict[str, float]:
        """When the task entered each state, in seconds since the request (from the task's own record)."""
        out: dict[str, float] = {}
        for entry in self.view.get("states", []):
            at = datetime.fromisoformat(str(entry["at"]).replace("Z", "+00:00")).timestamp()
            out.setdefault(str(entry["state"]), at - self.started_wall)
        return out

    def phase(self, start: str, end_states: tuple[str, ...]) -> float | None:
        """Seconds from entering ``start`` to entering the first of ``end_states`` that was reached."""
        times = self.state_times()
        if start not in times:
            return None
        ends = [times[s] for s in end_states if s in times and times[s] >= times[start]]
        return min(ends) - times[start] if ends else None

    def series(self, key: Callable[[dict[str, Any]], float | None]) -> list[tuple[float, float]]:
        """(seconds since the request, key(view)) for every sample where key gives a value."""
        out = []
        for t, view in self.samples:
            value = key(view)
            if value is not None:
                out.append((t - self.started, value))
        return out

    @property
    def error(self) -> dict[str, Any] | None:
        err = self.view.get("error")
        return dict(err) if isinstance(err, dict) else None

    def describe(self) -> str:
        err = self.error
        why = f" {err.get('code')}: {err.get('description')}" if err else ""
        took = self.elapsed
        return f"task {self.task_uuid} {self.state}{why} ({took:.1f} s)" if took else f"{self.state}{why}"


async def run_task(
    lab: Lab,
    host: Host,
    vm_uuid: str,
    body: dict[str, Any],
    *,
    receiver: CallbackRecorder | None = None,
    poll_s: float = 0.25,
    within_s: float = 900,
) -> TaskRun:
    """Start a migration on ``host``'s agent and follow it to its end (and to its final callback)."""
    if receiver is not None:
        body = {**body, "callbackUrl": receiver.url()}
    pids = await asyncio.to_thread(daemon_pids)
    run = TaskRun(str(body["taskUuid"]), time.monotonic(), time.time())
    async with agent_client(lab, host) as agent:
        try:
            await agent.start_migration(vm_uuid, body)
        except AgentUnreachable as err:
            raise Disturbed(f"the agent on {host.name} is unreachable: {err}") from err
        except ApiError as err:  # e.g. 502 while a teammate's fault test has libvirtd down
            raise Disturbed(f"the agent on {host.name} refused the request: {err}") from err
        async with asyncio.timeout(within_s):
            while True:
                try:
                    view = dict(await agent.task(run.task_uuid))
                except (AgentUnreachable, ApiError) as err:  # a teammate's fault test restarts the agent
                    run.disturbed = f"the agent on {host.name} was unreachable ({err})"
                    await asyncio.sleep(1)
                    continue
                now = time.monotonic()
                run.samples.append((now, view))
                run.view = view
                if view["state"] in FINAL:
                    run.ended = now
                    break
                await asyncio.sleep(poll_s)
    if receiver is not None:
        run.callback_at = await receiver.arrival(run.task_uuid, within=30)
        if run.callback_at is None:
            log.warning("no final callback for task %s within 30 s of its end", run.task_uuid)
    if gone := restarted(pids, await asyncio.to_thread(daemon_pids)):
        run.disturbed = f"restarted during the run: {', '.join(gone)}"
    log.info("%s%s", run.describe(), f" (disturbed: {run.disturbed})" if run.disturbed else "")
    return run


def require_clean(run: TaskRun, what: str) -> TaskRun:
    """The run, if it succeeded undisturbed; a disturbed run raises Disturbed, a failed one BenchError."""
    if run.disturbed:
        raise Disturbed(f"{what}: {run.disturbed}")
    if not run.succeeded or run.elapsed is None:
        raise BenchError(f"{what} failed: {run.describe()}")
    return run


async def active_tasks(lab: Lab) -> int:
    """Tasks of anybody (teammates share the lab) not yet final on any agent: noise for CPU figures."""
    count = 0
    for host in lab.hosts:
        with contextlib.suppress(Exception):
            async with agent_client(lab, host) as agent:
                count += sum(1 for t in await agent.tasks() if t["state"] not in FINAL)
    return count
