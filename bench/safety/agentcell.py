"""The agent's cells: a cross-host move through the source agent's API with ``strategy`` precopy,
auto-converge or auto, and ``auto-kill``: `auto` with the source agent SIGKILLed (`scripts/lab agent kill`)
once the task is in CONVERGING and started again 2 s later; the restarted agent resumes the task.
``auto-second``: `auto` with a second agent started on the source's state directory (the serving agent's
own command line, in the host's namespaces) once the task is in CONVERGING: what a lab kill that missed the
serving agent did before 9a66a5d (the state-directory lock); since then the second agent exits at once.
``auto-hotdisk``: `auto` with the cell's hot-disk guest (``HOT_CELLS``: a data volume, writing its root disk
fast enough for the disks' share of the cap): the move of the broken page of 2026-12-07, in write-blocking
mode."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from bench.labenv import BenchGuest, Host, Lab, lab_cli
from bench.safety.observe import Outcome, downtime_of
from labkit.agents import agent_client, task_view
from labkit.bodies import to_host_body
from labkit.hostsetup import spawn
from labkit.layout import host_by_name

BANDWIDTH_MIB_S = 16
DOWNTIME_MS = 500
CELLS = ("precopy", "auto-converge", "auto", "auto-kill", "auto-second", "auto-hotdisk")
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
KILL_AFTER_S = 1.0  # into CONVERGING: the controller has set its downtime and steers
RESTART_AFTER_S = 2.0


async def migrate(lab: Lab, guest: BenchGuest, cell: str, run_no: int) -> Outcome:
    src, dst = guest.host, lab.other(guest.host)
    strategy = "auto" if cell in ("auto-kill", "auto-second", "auto-hotdisk") else cell
    body = to_host_body(
        dst,
        strategy=strategy,
        bandwidth=BANDWIDTH_MIB_S,
        downTime=DOWNTIME_MS,
        timeout=300,
        withDataVolumes=cell == "auto-hotdisk",  # its guest has one: a move across hosts takes every disk
    )
    outcome = Outcome(cell, run_no, guest.name, src.name, dst.name, verdict="", detail="")
    started = time.monotonic()

    def call(what: str) -> None:
        outcome.calls.append((round(time.monotonic() - started, 2), what))

    call(f"POST migration {strategy} bandwidth {BANDWIDTH_MIB_S} downTime {DOWNTIME_MS} to {dst.name}")
    async with agent_client(lab, src) as agent:
        task_uuid = str((await agent.start_migration(guest.uuid, body))["taskUuid"])
    killed = False
    seen: list[str] = []
    deadline = started + 600
    while True:
        view = await task_view(lab, src, task_uuid, patience_s=120)
        if not seen or seen[-1] != view["state"]:
            seen.append(view["state"])
            call(f"task {view['state']}")
        if view["state"] in FINAL:
            break
        if cell == "auto-kill" and not killed and view["state"] == "CONVERGING":
            await asyncio.sleep(KILL_AFTER_S)
            call(f"scripts/lab agent kill {src.name}")
            await asyncio.to_thread(lab_cli, "agent", "kill", src.name)
            killed = True
            await asyncio.sleep(RESTART_AFTER_S)
            call(f"scripts/lab agent start {src.name}")
            await asyncio.to_thread(lab_cli, "agent", "start", src.name)
            call("agent started")
            continue
        if cell == "auto-second" and not killed and view["state"] == "CONVERGING":
            await asyncio.sleep(KILL_AFTER_S)
            killed = True
            await second_agent(src, call)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_uuid} not final after 600 s: {view['state']}")
        await asyncio.sleep(0.2)
    outcome.seconds = round(time.monotonic() - started, 1)
    outcome.verdict = "moved" if view["state"] == "SUCCEEDED" else "stayed"
    error = view.get("error") or {}
    outcome.detail = (
        f"{view['state']} {error.get('code', '')} task {task_uuid} states {'>'.join(seen)}".strip()
    )
    if cell in ("auto-kill", "auto-second") and not killed:
        outcome.detail += " (NOT KILLED: the task never showed CONVERGING to the poll)"
    outcome.downtime_ms = view.get("downtimeMs")
    if outcome.downtime_ms is None and outcome.verdict == "moved":  # not known to a resumed task
        outcome.downtime_ms = await asyncio.to_thread(downtime_of, dst, guest.name)
    return outcome


async def second_agent(src: Host, call: Callable[[str], None]) -> None:
    """Start the serving agent's command line once more under the host's holder; wait for it to end (at
    most 30 s, then SIGKILL it); its output goes to agent-second.log next to the agent's log."""
    serving = src.agent_pid()
    argv = Path(f"/proc/{serving}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    spec = host_by_name(src.name)
    log_file = spec.agent_log.with_name("agent-second.log")
    pid = await asyncio.to_thread(spawn, spec, argv, log_file, {"PYTHONUNBUFFERED": "1"})
    call(f"second agent pid {pid} started beside pid {serving}: {' '.join(argv)}")
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z":
                break
        except OSError:
            break
        await asyncio.sleep(0.2)
    if Path(f"/proc/{pid}").exists() and time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
        call(f"second agent pid {pid} still running after 30 s: SIGKILLed")
    tail = log_file.read_text(errors="replace").strip().splitlines()[-3:] if log_file.exists() else []
    call(f"second agent pid {pid} ended; its log ends: {' | '.join(tail)[-400:]}")
