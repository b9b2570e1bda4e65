"""``evacuate`` and ``evacuation``: many VMs off one host as one operation (issue 24).

``evacuate`` sends ``POST /v1/host/evacuations`` (the VMs, or ``--all``; one destination from the options,
or the whole body from ``--body FILE`` for several destinations or a destination per VM) and with ``--wait``
follows it: on a terminal one progress bar per VM and one for the whole evacuation (rich), elsewhere a
plain line at most every second. It exits 0 only when every VM's verdict is true.
``evacuation show|watch|cancel UUID`` reads, follows or cancels one (``--rollback``: the running moves are
cancelled too and roll back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from rich.progress import TaskID

from agent.client import AgentClient, BadResponse
from agent.client.errors import local_error
from agent.config import ConfigError, read_secret
from agent.evacuation import EvacuationRequest

from .exits import Exit, UsageError
from .output import Output, human_bytes, human_duration, human_rate, number
from .progress import rich_bars

FINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def evacuation_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request from ``--body`` or the options, checked with the agent's own model first."""
    if args.body is not None:
        try:
            body: dict[str, Any] = json.loads(args.body.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"--body: cannot read {args.body}: {err}") from err
        if not isinstance(body, dict):
            raise UsageError("--body: the file must hold a JSON object")
    else:
        if not args.all and not args.vm:
            raise UsageError("name the VMs (--vm UUID, repeated) or --all, or give --body FILE")
        if args.dst_host_uuid is None or args.dst_storage is None or args.dst_agent is None:
            raise UsageError(
                "a destination needs --dst-host-uuid, --dst-agent and --dst-storage (or --body FILE)"
            )
        dst_host: dict[str, Any] = {"uuid": args.dst_host_uuid, "agentUrl": args.dst_agent}
        if args.dst_migration_address is not None:
            dst_host["migrationAddress"] = args.dst_migration_address
        if args.dst_token_file is not None:
            try:
                dst_host["token"] = read_secret(args.dst_token_file, "--dst-token-file")
            except ConfigError as err:
                raise UsageError(str(err)) from err
        destination: dict[str, Any] = {"dstHost": dst_host, "dstPrimaryStorageUuid": args.dst_storage}
        if args.dst_incoming is not None:
            destination["incomingMigrations"] = args.dst_incoming
        body = {"vms": "all" if args.all else list(args.vm), "destinations": [destination]}
    migrate_vm = dict(body.get("migrateVm") or {})
    if args.bandwidth is not None:
        migrate_vm["bandwidth"] = args.bandwidth
    if args.downtime is not None:
        migrate_vm["downTime"] = args.downtime
    if migrate_vm:
        body["migrateVm"] = migrate_vm
    for option, key in (
        ("priority", "priority"),
        ("evacuation_uuid", "evacuationUuid"),
        ("strategy", "strategy"),
    ):
        if getattr(args, option) is not None:
            body[key] = getattr(args, option)
    for option, key in (
        ("with_data_volumes", "withDataVolumes"),
        ("with_snapshots", "withSnapshots"),
        ("allow_postcopy", "allowPostCopy"),
    ):
        if getattr(args, option):
            body[key] = True
    try:
        EvacuationRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise UsageError(f"{where}: {first['msg']}") from err
    return body


async def evacuate(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    answer = await client.start_evacuation(evacuation_body(args))
    uuid = answer.get("evacuationUuid") if isinstance(answer, dict) else None
    if not uuid:
        raise BadResponse(
            local_error("CLIENT.BAD_RESPONSE", "the agent accepted but named no evacuationUuid")
        )
    heading = f"evacuation {uuid}: {len(answer.get('vms') or [])} VMs"
    if not out.accepted(answer, uuid, wait=args.wait, heading=heading):
        return Exit.OK
    return await follow(client, uuid, args, out)


async def evacuation(client: AgentClient, args: argparse.Namespace, out: Output) -> int:
    if args.action == "show":
        view = await client.evacuation(args.evacuation_uuid)
        if out.json_mode:
            out.json(view)
        else:
            summary(out, view)
        return Exit.OK
    if args.action == "cancel":
        view = await client.cancel_evacuation(args.evacuation_uuid, rollback=args.rollback)
        if out.json_mode:
            out.json(view)
        else:
            out.line(f"evacuation {args.evacuation_uuid}: {view.get('state')}")
        return Exit.OK
    return await follow(client, args.evacuation_uuid, args, out)


async def follow(client: AgentClient, uuid: str, args: argparse.Namespace, out: Output) -> int:
    """Poll the evacuation until it ends; the bars (or lines) meanwhile, then the summary."""
    view = make_view(out)
    final: dict[str, Any] = {}
    stop_it = f"stop it: kvm-storage-agent evacuation cancel {uuid}"
    with out.watching(f"stopped watching; evacuation {uuid} goes on ({stop_it})"):
        try:
            while True:
                final = await client.evacuation(uuid)
                view.update(final)
                if final.get("state") in FINAL:
                    break
                await asyncio.sleep(args.poll_interval)
        finally:
            view.close()
    if out.json_mode:
        out.json(final)
    else:
        summary(out, final)
    return exit_for_evacuation(final)


def exit_for_evacuation(view: dict[str, Any]) -> int:
    """0 only when every VM's verdict is true."""
    vms = view.get("vms") or []
    return (
        Exit.OK
        if view.get("state") == "SUCCEEDED" and all(v.get("verdict") is True for v in vms)
        else Exit.FAILED
    )


def summary(out: Output, view: dict[str, Any]) -> None:
    progress = view.get("progress") or {}
    out.line(
        f"evacuation {view.get('evacuationUuid')}: {view.get('state')}, "
        f"{progress.get('vmsDone', 0)}/{progress.get('vmsTotal', 0)} VMs done "
        f"({progress.get('vmsSucceeded', 0)} succeeded), "
        f"{_amount(progress)}"
    )
    for vm in view.get("vms") or []:
        destination = (vm.get("destination") or {}).get("hostUuid") or "-"
        verdict = {True: "ok", False: "FAILED", None: "..."}[vm.get("verdict")]
        line = f"  {vm.get('vmUuid')}  {vm.get('state'):<10} {verdict:<6} -> {destination}"
        if vm.get("downtimeMs") is not None:
            line += f"  downtime {vm['downtimeMs']} ms"
        error = vm.get("error") or {}
        if error:
            line += f"  {error.get('code')}: {error.get('description')}"
        out.line(line)


class LineView:
    """Off a terminal: one line for the whole evacuation at most every ``interval`` seconds."""

    def __init__(
        self, out: Output, *, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._out = out
        self._interval = interval
        self._clock = clock
        self._last: float | None = None

    def update(self, view: dict[str, Any]) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval and view.get("state") not in FINAL:
            return
        self._last = now
        p = view.get("progress") or {}
        states = " ".join(f"{(vm.get('vmUuid') or '')[:8]}:{vm.get('state')}" for vm in view.get("vms") or [])
        self._out.line(
            f"{view.get('state')}  {p.get('vmsDone', 0)}/{p.get('vmsTotal', 0)} VMs  "
            f"{p.get('percent', 0):5.1f}%  {_amount(p)}  {human_rate(number(p.get('bytesPerSecond')))}  "
            f"ETA {human_duration(number(p.get('etaSeconds')))}  {states}"
        )

    def close(self) -> None:
        pass


class NoView:
    def update(self, view: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class BarsView:
    """On a terminal: one bar for the whole evacuation, one per VM; percentages never go back."""

    def __init__(self, out: Output) -> None:
        self._progress = rich_bars(out, label_width=30)
        self._bars: dict[str, TaskID] = {}
        self._percent: dict[str, float] = {}
        self._started = False

    def _bar(self, key: str, percent: float, **fields: Any) -> None:
        percent = max(self._percent.get(key, 0.0), min(100.0, percent))
        self._percent[key] = percent
        if key not in self._bars:
            self._bars[key] = self._progress.add_task("", total=100.0, **fields)
        self._progress.update(self._bars[key], completed=percent, **fields)

    def update(self, view: dict[str, Any]) -> None:
        p = view.get("progress") or {}
        final = view.get("state") in FINAL
        self._bar(
            "total",
            float(p.get("percent") or 0.0),
            label=f"all: {p.get('vmsDone', 0)}/{p.get('vmsTotal', 0)} VMs {view.get('state')}",
            amount=_amount(p),
            rate=human_rate(number(p.get("bytesPerSecond"))),
            eta=human_duration(None if final else number(p.get("etaSeconds"))),
        )
        for vm in view.get("vms") or []:
            uuid = str(vm.get("vmUuid"))
            percent = 100.0 if vm.get("state") == "SUCCEEDED" else float(vm.get("percent") or 0.0)
            self._bar(
                uuid,
                percent,
                label=f"  {uuid[:8]} {vm.get('state')}",
                amount=_amount(vm),
                rate=human_rate(number(vm.get("bytesPerSecond"))),
                eta="-",
            )
        if not self._started:
            self._progress.start()
            self._started = True

    def close(self) -> None:
        if self._started:
            self._progress.refresh()
        self._progress.stop()


def make_view(out: Output) -> LineView | NoView | BarsView:
    if out.json_mode:
        return NoView()
    if out.interactive:
        return BarsView(out)
    return LineView(out)


def _amount(progress: dict[str, Any]) -> str:
    done, total = number(progress.get("bytesDone")), number(progress.get("bytesTotal"))
    return f"{human_bytes(done)} / {human_bytes(total)}"
