"""Case 4: live migration across hosts of a guest that dirties memory at several rates, one bandwidth and
one requested downtime, strategy `auto` (the agent's controller) against `precopy` (downtime set once):
measured against requested downtime, total time, converged or not. The progress of each run is kept for
the plot (percent, transfer rate, the controller's downtime setting, memory remaining)."""

from __future__ import annotations

import logging
import os
from typing import Any

from bench.agentrun import TaskRun, run_task
from bench.context import Context
from bench.labenv import BenchError, BenchGuest, Disturbed, MiB, bench_guest, measure_again_if_disturbed
from bench.table import Row, Target
from labkit.bodies import to_host_body

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "precopy")


def _downtime_setting(view: dict[str, Any]) -> float | None:
    """The controller's current downtime setting: the latest decision that names one."""
    decisions = (view.get("details") or {}).get("decisions") or []
    for decision in reversed(decisions):
        if isinstance(decision, dict) and decision.get("downtime_ms"):
            return float(decision["downtime_ms"])
    return None


def _memory_remaining(view: dict[str, Any]) -> float | None:
    for item in view.get("volumes", []):
        if item.get("kind") == "memory" and item.get("bytesTotal"):
            return float(item["bytesTotal"] - item["bytesDone"])
    return None


def series_of(run: TaskRun) -> dict[str, Any]:
    """The run's progress as plain lists (seconds since the request), for the plot and the JSON file."""
    t0 = run.started
    points = [
        {
            "t": round(t - t0, 3),
            "state": view["state"],
            "percent": view["progress"]["percent"],
            "rateMiBs": (view["progress"].get("bytesPerSecond") or 0) / MiB,
            "downtimeSettingMs": _downtime_setting(view),
            "memoryRemainingMiB": None if (m := _memory_remaining(view)) is None else m / MiB,
        }
        for t, view in run.samples
    ]
    return {"points": points, "states": run.state_times()}


def _outcome(run: TaskRun) -> dict[str, Any]:
    err = run.error or {}
    return {
        "state": run.state,
        "converged": run.succeeded,
        "totalS": run.elapsed,
        "downtimeMs": run.view.get("downtimeMs"),
        "finalSettingMs": _downtime_setting(run.view),
        "error": err.get("code"),
        "errorText": err.get("description"),
        "postcopy": "postcopy" in (run.view.get("details") or {}),
        "vmAtEnd": run.view.get("benchVmAtEnd", {}),
    }


async def _migrate(ctx: Context, guest: BenchGuest, strategy: str) -> TaskRun:
    s = ctx.settings
    src, dst = guest.host, ctx.lab.other(guest.host)
    body = to_host_body(
        dst,
        bandwidth=s.live_bandwidth,
        downTime=s.live_downtime_ms,
        strategy=strategy,
        timeout=s.live_timeout_s,
    )
    run = await run_task(
        ctx.lab, src, guest.uuid, body, receiver=ctx.receiver, poll_s=0.25, within_s=s.live_timeout_s + 300
    )
    # Where the VM is the moment the task says it is over (a management plane acts on that answer).
    at_end = {h.name: h.virsh("domstate", guest.name, check=False).strip() for h in (src, dst)}
    run.view.setdefault("benchVmAtEnd", {k: v for k, v in at_end.items() if v})
    guest.locate(ctx.lab)
    guest.drop_unused_files()
    if run.disturbed:
        raise Disturbed(f"{strategy} migration: {run.disturbed}")
    if (run.error or {}).get("code") == "AGENT.PEER_UNREACHABLE":  # a teammate had stopped hostB's agent
        raise Disturbed(f"{strategy} migration: the destination agent was unreachable")
    if run.state not in ("SUCCEEDED", "FAILED"):
        raise BenchError(f"{strategy} migration ended {run.describe()}")
    return run


async def run_case(ctx: Context) -> list[Row]:
    s = ctx.settings
    title = (
        f"live migration hostA<->hostB, {s.live_bandwidth} MiB/s, downTime {s.live_downtime_ms} ms, "
        f"timeout {s.live_timeout_s} s, 256 MiB guest"
    )
    outcomes: dict[tuple[int, str], list[dict[str, Any]]] = {}
    series: dict[str, Any] = {}
    for rate in s.dirty_rates:
        with bench_guest(ctx.lab, f"dirty{rate}", dirty_mib_s=rate) as guest:

            def recover(guest: BenchGuest = guest) -> None:
                guest.locate(ctx.lab)
                guest.drop_unused_files()

            for rep in range(s.live_reps):
                order = STRATEGIES if rep % 2 == 0 else tuple(reversed(STRATEGIES))
                for strategy in order:

                    async def one(guest: BenchGuest = guest, strategy: str = strategy) -> TaskRun:
                        return await _migrate(ctx, guest, strategy)

                    os.sync()
                    run = await measure_again_if_disturbed(f"{strategy} at {rate} MiB/s", one, recover)
                    outcome = _outcome(run)
                    outcomes.setdefault((rate, strategy), []).append(outcome)
                    series.setdefault(f"{rate}:{strategy}", series_of(run))
                    log.info("case 4 dirty %d MiB/s %s rep %d: %s", rate, strategy, rep + 1, outcome)
    ctx.raw["4"] = {f"{rate}:{strategy}": runs for (rate, strategy), runs in outcomes.items()}
    ctx.plot_runs.update(choose_plot(series, s.dirty_rates, outcomes))
    ctx.plot_runs["title"] = title
    rows = []
    for rate in s.dirty_rates:
        for strategy in STRATEGIES:
            runs = outcomes.get((rate, strategy), [])
            converged = [r for r in runs if r["converged"]]
            errors = sorted({str(r["error"]) for r in runs if not r["converged"]})
            subject = f"{strategy}, guest dirtying {rate} MiB/s"
            settings = sorted({r["finalSettingMs"] for r in runs if r["finalSettingMs"]})
            note = f"converged {len(converged)}/{len(runs)}"
            if errors:
                note += f"; not converged: {', '.join(errors)}"
            if settings:
                note += f"; downtime setting at the end {', '.join(f'{v:.0f}' for v in settings)} ms"
            odd = [r["vmAtEnd"] for r in runs if "running" not in r["vmAtEnd"].values()]
            if odd:
                note += f"; VM not running anywhere when the task ended: {odd}"
            rows.append(
                Row("4", title, subject, "measured downtime", "ms",
                    [float(r["downtimeMs"]) for r in converged if r["downtimeMs"] is not None],
                    target=Target(high=s.live_downtime_ms, on="value"), note=note)
            )  # fmt: skip
            rows.append(
                Row("4", title, subject, "total time (to success or failure)", "s",
                    [float(r["totalS"]) for r in runs if r["totalS"] is not None])
            )  # fmt: skip
    return rows


def choose_plot(
    series: dict[str, Any], rates: tuple[int, ...], outcomes: dict[tuple[int, str], list[dict[str, Any]]]
) -> dict[str, Any]:
    """The most telling pair of runs for the plot: the highest dirty rate at which auto converged (with
    precopy at the same rate beside it), else the highest rate measured."""
    chosen = next(
        (
            r
            for r in sorted(rates, reverse=True)
            if any(o["converged"] for o in outcomes.get((r, "auto"), []))
        ),
        max(rates),
    )
    runs = {strategy: series[key] for strategy in STRATEGIES if (key := f"{chosen}:{strategy}") in series}
    return {
        "dirtyMiBs": chosen,
        "runs": runs,
        "outcomes": {k: outcomes.get((chosen, k), []) for k in STRATEGIES},
    }
