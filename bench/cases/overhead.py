"""Case 5: what the agent itself costs. CPU seconds of the agent processes while idle and per migrated GiB
(from the moves of cases 1 and 2), and the latency of `GET /v1/tasks/{id}` under a steady open-loop load
while four migrations run (two per agent, the lab's outgoing limit), against the same load once they are
done (same tasks, same request mix)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from agent.client import ClientError
from bench.agentrun import FINAL, active_tasks
from bench.cases.samehost import other_root
from bench.context import Context
from bench.labenv import BenchGuest, GiB, Host, bench_guest, cpu_of
from bench.stats import percentile
from bench.table import Row
from labkit.agents import agent_client
from labkit.bodies import migration_body

log = logging.getLogger(__name__)


async def _idle_cpu(ctx: Context, seconds: float) -> dict[str, Any]:
    busy_before = await active_tasks(ctx.lab)
    before = {h.name: cpu_of(h) for h in ctx.lab.hosts}
    await asyncio.sleep(seconds)
    after = {h.name: cpu_of(h) for h in ctx.lab.hosts}
    busy_after = await active_tasks(ctx.lab)
    out: dict[str, Any] = {"seconds": seconds, "busyTasks": max(busy_before, busy_after), "perAgent": {}}
    for name in before:
        a, b = after[name], before[name]
        used = a.since(b) if a and b else None
        if used is not None and a is not None and b is not None:
            out["perAgent"][name] = used[0] / (a.at - b.at)  # CPU seconds per second
    return out


async def _load(
    ctx: Context, targets: list[tuple[Host, str]], rps: float, until: asyncio.Event, max_s: float
) -> list[float]:
    """Open loop: one GET every 1/rps seconds, round-robin over the tasks, each timed on its own (a slow
    answer does not delay the next request). Latencies in ms."""
    latencies: list[float] = []
    clients = {h.name: agent_client(ctx.lab, h) for h, _ in targets}
    pending: set[asyncio.Task[None]] = set()

    async def one(host: Host, task_uuid: str) -> None:
        started = time.monotonic()
        with contextlib.suppress(ClientError):
            await clients[host.name].task(task_uuid)
            latencies.append((time.monotonic() - started) * 1000)

    try:
        start = time.monotonic()
        i = 0
        while not until.is_set() and time.monotonic() - start < max_s:
            host, task_uuid = targets[i % len(targets)]
            job = asyncio.create_task(one(host, task_uuid))
            pending.add(job)
            job.add_done_callback(pending.discard)
            i += 1
            delay = start + i / rps - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), delay)
        if pending:
            await asyncio.wait(pending, timeout=30)
    finally:
        for client in clients.values():
            await client.close()
    return latencies


async def _wait_final(ctx: Context, targets: list[tuple[Host, str]], done: asyncio.Event) -> list[str]:
    states: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = {h.name: await stack.enter_async_context(agent_client(ctx.lab, h)) for h, _ in targets}
        while len(states) < len(targets):
            for host, task_uuid in targets:
                if task_uuid not in states:
                    view = await clients[host.name].task(task_uuid)
                    if view["state"] in FINAL:
                        states[task_uuid] = str(view["state"])
            await asyncio.sleep(0.5)
    done.set()
    return list(states.values())


async def _latency(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    async with contextlib.AsyncExitStack() as stack:
        guests: list[BenchGuest] = []
        for host in ("hostA", "hostA", "hostB", "hostB"):
            guests.append(
                stack.enter_context(bench_guest(ctx.lab, "load", host=host, fill_mib=s.load_fill_mib))
            )
        targets: list[tuple[Host, str]] = []
        for guest in guests:
            body = migration_body(other_root(guest, guest.sources()["vda"]).uuid, bandwidth=s.load_cap_mib_s)
            async with agent_client(ctx.lab, guest.host) as agent:
                await agent.start_migration(guest.uuid, body)
            targets.append((guest.host, str(body["taskUuid"])))
        done = asyncio.Event()
        waiter = asyncio.create_task(_wait_final(ctx, targets, done))
        started = time.monotonic()
        busy = await _load(ctx, targets, s.load_rps, done, max_s=600)
        busy_s = time.monotonic() - started
        states = await waiter
        for guest in guests:
            guest.drop_unused_files()
        idle = await _load(ctx, targets, s.load_rps, asyncio.Event(), max_s=min(busy_s, 20))
    return {"busy": busy, "idle": idle, "busySeconds": busy_s, "states": states}


async def run_case(ctx: Context) -> list[Row]:
    s = ctx.settings
    title = "agent overhead"
    idle = await _idle_cpu(ctx, s.idle_s)
    latency = await _latency(ctx)
    ctx.raw["5"] = {"idleCpu": idle, "latency": {k: v for k, v in latency.items()}}
    rows = []
    idle_values = list(idle["perAgent"].values())
    busy_note = f"; {idle['busyTasks']} other task(s) (teammates') were running" if idle["busyTasks"] else ""
    rows.append(
        Row("5", title, "agent, idle", "CPU", "% of one core", [v * 100 for v in idle_values],
            note=f"both agents over {s.idle_s:.0f} s{busy_note}")
    )  # fmt: skip
    for kind in ("same-host", "cross-host"):
        uses = [u for u in ctx.cpu if u.kind == kind and u.bytes_moved > 0]
        if not uses:
            continue
        who = "source agent" if kind == "same-host" else "both agents"
        rows.append(
            Row("5", title, f"agent, {kind} move ({who})", "CPU per migrated GiB", "s",
                [u.own_s / (u.bytes_moved / GiB) for u in uses],
                note=f"from case {uses[0].case}; their qemu-img children: "
                     f"{sum(u.children_s for u in uses) / sum(u.bytes_moved / GiB for u in uses):.3f} s/GiB")
        )  # fmt: skip
    for phase, values in (("while 4 migrations run", latency["busy"]), ("after they ended", latency["idle"])):
        if not values:
            continue
        ended = f"; the migrations ended {', '.join(latency['states'])}" if phase.startswith("while") else ""
        rows.append(
            Row("5", title, f"GET /v1/tasks/{{id}}, {s.load_rps:.0f} requests/s, {phase}",
                "latency (median = p50)", "ms", values,
                note=f"p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms, "
                     f"max {max(values):.1f} ms over {len(values)} requests{ended}")
        )  # fmt: skip
    return rows
