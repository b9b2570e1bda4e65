"""The client subcommands: each talks to one agent through ``AgentClient`` and returns an exit code."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agent.client import AgentClient, BadResponse, TaskView, follow_task
from agent.client.errors import local_error

from . import render
from .body import migration_body
from .exits import Exit, UsageError, exit_for_task
from .output import Output
from .progress import make_progress_view

Handler = Callable[[AgentClient, argparse.Namespace, Output], Awaitable[int]]
_Answer = TypeVar("_Answer")


def _print(out: Output, answer: _Answer, human: Callable[[Output, _Answer], None]) -> int:
    """The agent's answer as it came in ``--json`` mode, else as ``human`` renders it."""
    if out.json_mode:
        out.json(answer)
    else:
        human(out, answer)
    return Exit.OK


async def migrate(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    """Start a storage migration; print its task uuid, or with ``--wait`` follow it to the end."""
    body = migration_body(args)
    answer = await client.start_migration(args.vm_uuid, body)
    task_uuid = answer.get("taskUuid") if isinstance(answer, dict) else None
    if not task_uuid:
        raise BadResponse(local_error("CLIENT.BAD_RESPONSE", "the agent accepted but named no taskUuid"))
    if not out.accepted(answer, task_uuid, wait=args.wait, heading=f"task {task_uuid}"):
        return Exit.OK
    return await follow(client, task_uuid, args, out)


async def watch(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    return await follow(client, args.task_uuid, args, out)


async def follow(client: AgentClient, task_uuid: str, args: argparse.Namespace, out: Output) -> int:
    """The progress view until the task ends, then the summary; the exit code says how it ended."""
    view = make_progress_view(out)
    final: TaskView | None = None
    snapshots = follow_task(
        client, task_uuid, poll_interval=args.poll_interval, use_events=not args.no_events
    )
    stop_it = f"stop it: kvm-storage-agent cancel {task_uuid}"
    with out.watching(f"stopped watching; task {task_uuid} goes on ({stop_it})"):
        try:
            async with contextlib.aclosing(snapshots):
                async for final in snapshots:
                    view.update(final)
        finally:
            view.close()
    if final is None:  # follow_task always yields at least once; keeps the type checker honest
        raise BadResponse(local_error("CLIENT.BAD_RESPONSE", f"no state for task {task_uuid}"))
    if out.json_mode:
        out.json(final)
        for line in render.error_lines(final.get("error") or {}):
            out.note(line)
    else:
        render.summary(out, final)
    return exit_for_task(final)


async def tasks(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    return _print(out, await client.tasks(state=args.state, vm_uuid=args.vm), render.task_table)


async def show(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    return _print(out, await client.task(args.task_uuid), render.task_detail)


async def cancel(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    answer = await client.cancel(args.task_uuid)
    if out.json_mode:
        out.json(answer)
    elif isinstance(answer, dict) and answer.get("state"):
        out.line(f"task {args.task_uuid}: {answer['state']}")
    else:
        out.line(f"task {args.task_uuid}: cancel requested")
    return Exit.OK


async def retune(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    if args.bandwidth is None and args.downtime is None:
        raise UsageError("retune needs --bandwidth and/or --downtime")
    answer = await client.patch_task(args.task_uuid, bandwidth=args.bandwidth, downtime=args.downtime)
    if out.json_mode:
        out.json(answer)
        return Exit.OK
    asked = []
    if args.bandwidth is not None:
        asked.append(f"bandwidth {args.bandwidth} MiB/s" if args.bandwidth else "bandwidth uncapped")
    if args.downtime is not None:
        asked.append(f"downtime {args.downtime} ms")
    state = answer.get("state") if isinstance(answer, dict) else None
    out.line(f"task {args.task_uuid}: {state or 'retuned'} ({', '.join(asked)})")
    return Exit.OK


async def vms(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    return _print(out, await client.list_vms(), render.vm_table)


async def vm(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    return _print(out, await client.vm(args.vm_uuid), render.vm_detail)


async def host(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    return _print(out, await client.host(), render.host_detail)


async def health(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    answer = await client.health()
    if out.json_mode:
        out.json(answer)
    else:
        status = answer.get("status") if isinstance(answer, dict) else None
        out.line(f"{client.base_url}: {status or 'ok'}")
    return Exit.OK
