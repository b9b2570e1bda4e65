"""Case 9: a host evacuation under one host budget (issue 24). Four VMs leave one host for the other: two
quiet, one dirtying its memory, one writing its disk. The agent does it as one evacuation
(``POST /v1/host/evacuations``) under a host budget of ``BUDGET_MIB`` with the four at once; the baselines
are what an operator would type with plain libvirt under the same budget: four ``virsh migrate --bandwidth
BUDGET/4`` at once, and the four one after another at ``--bandwidth BUDGET``. The three take turns moving the
same four guests (hostA -> hostB, back, and again).

Measured from outside the agent: the total time, the source's highest 5 s window on its wire (its namespace's
``eth0`` counters) against the budget, each VM's downtime (the task's, or libvirt's ``domjobinfo`` on the
destination), and how fair the agent's shares were (Jain's index over the four shares while all four copied,
1.0 = equal). The plot: the four tasks' rates over the evacuation."""

from __future__ import annotations

import asyncio
import logging
import re
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.context import Context
from bench.labenv import BenchError, BenchGuest, GuestHarmed, Host, bench_guest
from bench.stats import jain
from bench.table import Row, Target
from bench.virshmigrate import virsh_migrate
from labkit.agents import agent_client
from labkit.bodies import evacuation_destination
from labkit.linkcount import WINDOW_S, LinkCounter

log = logging.getLogger(__name__)

BUDGET_MIB = 40
MiB = 1024 * 1024
#: (what the guest does, bench_guest options): the issue's four shapes.
SHAPES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("quiet", {"fill_mib": 128}),
    ("quiet", {"fill_mib": 128}),
    ("memory 16 MiB/s", {"fill_mib": 64, "dirty_mib_s": 16, "memory_mib": 256}),
    ("disk 4 MiB/s", {"fill_mib": 64, "disk_write_mib_s": 4}),
)
AGENT = "agent evacuation"
VIRSH_AT_ONCE = f"4 x virsh migrate --bandwidth {BUDGET_MIB // 4} at once"
VIRSH_IN_TURN = f"4 x virsh migrate --bandwidth {BUDGET_MIB} in turn"
#: libvirt's own options for both baselines: peer to peer over TLS, as the agent migrates, and auto-converge
#: (the dirtying guest does not converge at 10 MiB/s without it).
VIRSH_OPTIONS = ["--p2p", "--tls", "--auto-converge"]
_DOWNTIME = re.compile(r"Total downtime:\s+(\d+)\s*ms")
PLOT_FILE = "evacuation.png"


def _worst_window(link: LinkCounter, began: float, ended: float) -> float | None:
    windows = link.windows(began, ended)
    return max(r for _, r in windows) / MiB if windows else None


async def _agent(ctx: Context, guests: list[BenchGuest], src: Host, dst: Host) -> dict[str, Any]:
    body = {
        "vms": [g.uuid for g in guests],
        "destinations": [evacuation_destination(dst, len(guests))],
        "migrateVm": {"downTime": 300},
    }
    rates: list[tuple[float, dict[str, float]]] = []
    fairness: list[float] = []
    async with agent_client(ctx.lab, src) as agent:
        limits = {"outgoing": BUDGET_MIB, "outgoingMigrations": len(guests)}
        await agent.request("PATCH", "v1", "host", "budget", json_body=limits)
        try:
            with LinkCounter(src) as link:
                began = time.monotonic()
                created = await agent.request("POST", "v1", "host", "evacuations", json_body=body)
                while True:
                    view = await agent.request("GET", "v1", "host", "evacuations", created["evacuationUuid"])
                    now = time.monotonic() - began
                    rates.append((now, {v["vmUuid"]: (v["bytesPerSecond"] or 0) / MiB for v in view["vms"]}))
                    budget = (await agent.request("GET", "v1", "host", "budget"))["outgoing"]["shares"]
                    if len(budget) == len(guests) and all(s["state"] == "COPYING" for s in budget):
                        index = jain([float(s["bytesPerSecond"]) for s in budget])
                        if index is not None:
                            fairness.append(index)
                    if view["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                        break
                    await asyncio.sleep(0.5)
                ended = time.monotonic()
        finally:
            lab_own = {"outgoing": 0, "outgoingMigrations": 2}  # the lab's: no budget, two at once
            await agent.request("PATCH", "v1", "host", "budget", json_body=lab_own)
    for guest in guests:
        await asyncio.to_thread(guest.locate, ctx.lab)
        await asyncio.to_thread(guest.drop_unused_files)
    if view["state"] != "SUCCEEDED":
        failed = [(v["vmUuid"], v["state"], (v["error"] or {}).get("code")) for v in view["vms"]]
        raise BenchError(f"the evacuation ended {view['state']}: {failed}")
    return {
        "totalS": ended - began,
        "worstWindowMiBs": _worst_window(link, began, ended),
        "downtimesMs": [v["downtimeMs"] for v in view["vms"]],
        "fairness": statistics.median(fairness) if fairness else None,
        "rates": rates,
        "names": {g.uuid: g.name for g in guests},
    }


def _virsh_one(ctx: Context, guest: BenchGuest, bandwidth: int, out: dict[str, Any]) -> None:
    dst = ctx.lab.other(guest.host)
    try:
        virsh_migrate(ctx.lab, guest, [*VIRSH_OPTIONS, "--bandwidth", str(bandwidth)])
    except GuestHarmed as err:
        out["harmed"] = str(err)
        return
    except BenchError as err:
        out["error"] = str(err)
        return
    found = _DOWNTIME.search(dst.virsh("domjobinfo", "--completed", guest.name, check=False))
    out["downtimeMs"] = float(found.group(1)) if found else None


def _virsh(ctx: Context, guests: list[BenchGuest], src: Host, *, at_once: bool) -> dict[str, Any]:
    outcomes: list[dict[str, Any]] = [{} for _ in guests]
    bandwidth = BUDGET_MIB // len(guests) if at_once else BUDGET_MIB
    with LinkCounter(src) as link:
        began = time.monotonic()
        if at_once:
            threads = [
                threading.Thread(target=_virsh_one, args=(ctx, g, bandwidth, o))
                for g, o in zip(guests, outcomes, strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for guest, outcome in zip(guests, outcomes, strict=True):
                _virsh_one(ctx, guest, bandwidth, outcome)
        ended = time.monotonic()
    if harmed := [o["harmed"] for o in outcomes if "harmed" in o]:
        raise GuestHarmed("; ".join(harmed))
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise BenchError("; ".join(errors))
    return {
        "totalS": ended - began,
        "worstWindowMiBs": _worst_window(link, began, ended),
        "downtimesMs": [o.get("downtimeMs") for o in outcomes],
    }


def plot_rates(result: dict[str, Any], path: Path) -> None:
    """The four tasks' rates over the agent's evacuation, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = result["names"]
    for vm_uuid, label in zip(names, result["labels"], strict=True):
        points = [(t, r[vm_uuid]) for t, r in result["rates"] if vm_uuid in r]
        ax.plot([t for t, _ in points], [v for _, v in points], label=label)
    ax.axhline(BUDGET_MIB, color="black", linestyle=":", label=f"host budget {BUDGET_MIB} MiB/s")
    ax.set_xlabel("seconds since the evacuation was asked")
    ax.set_ylabel("task rate (MiB/s)")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


async def run_case(ctx: Context) -> list[Row]:
    title = f"4 VMs hostA -> hostB (2 quiet, memory 16 MiB/s, disk 4 MiB/s), budget {BUDGET_MIB} MiB/s"
    results: dict[str, dict[str, Any]] = {}
    harmed: dict[str, str] = {}
    src, dst = ctx.lab.host("hostA"), ctx.lab.host("hostB")
    with (
        bench_guest(ctx.lab, "evac-1", **SHAPES[0][1]) as g1,
        bench_guest(ctx.lab, "evac-2", **SHAPES[1][1]) as g2,
        bench_guest(ctx.lab, "evac-3", **SHAPES[2][1]) as g3,
        bench_guest(ctx.lab, "evac-4", **SHAPES[3][1]) as g4,
    ):
        guests = [g1, g2, g3, g4]

        async def agent() -> dict[str, Any]:
            return await _agent(ctx, guests, src, dst)

        async def at_once() -> dict[str, Any]:
            return await asyncio.to_thread(_virsh, ctx, guests, dst, at_once=True)

        async def in_turn() -> dict[str, Any]:
            return await asyncio.to_thread(_virsh, ctx, guests, src, at_once=False)

        subjects: tuple[tuple[str, Callable[[], Awaitable[dict[str, Any]]]], ...] = (
            (AGENT, agent),
            (VIRSH_AT_ONCE, at_once),
            (VIRSH_IN_TURN, in_turn),
        )
        for subject, measure in subjects:
            try:
                results[subject] = await measure()
            except GuestHarmed as err:
                # A finding, not a failed measurement: the harmed guest stays for a look, the case stops
                # (where its guests run is no longer known) and says which way harmed which guest.
                log.error("case 9 %s harmed a guest: %s", subject, err)
                harmed[subject] = str(err)
                for guest in guests:
                    guest.keep = guest.keep or guest.name in str(err)
                break
            log.info("case 9 %s: %.1f s", subject, results[subject]["totalS"])
        if AGENT in results:
            results[AGENT]["labels"] = [shape for shape, _ in SHAPES]
    ctx.raw["9"] = {**results, "harmed": harmed}
    if AGENT in results:
        ctx.figures[PLOT_FILE] = lambda path: plot_rates(results[AGENT], path)
    rows = [Row("9", title, subject, "total time", "s", not_measured=f"harmed a guest: {why}")
            for subject, why in harmed.items()]  # fmt: skip
    totals = {subject: [result["totalS"]] for subject, result in results.items()}
    for baseline in (VIRSH_AT_ONCE, VIRSH_IN_TURN):  # the agent no later than the best of them
        if AGENT in totals and baseline in totals:
            rows.append(
                Row("9", title, AGENT, "total time", "s", totals[AGENT], baseline=baseline,
                    baseline_values=totals[baseline], target=Target(high=1.0))
            )  # fmt: skip
    for subject, result in results.items():
        if subject != AGENT or not any(r.baseline for r in rows):
            rows.append(Row("9", title, subject, "total time", "s", totals[subject]))
        worst = result["worstWindowMiBs"]
        rows.append(
            Row("9", title, subject, f"highest {WINDOW_S:.0f} s window / budget", "x",
                [worst / BUDGET_MIB] if worst is not None else [],
                target=Target(high=1.05, on="value") if subject == AGENT else None)
        )  # fmt: skip
        downtimes = [float(d) for d in result["downtimesMs"] if d is not None]
        rows.append(Row("9", title, subject, "downtime per VM", "ms", downtimes))
    if AGENT in results:
        fairness = results[AGENT]["fairness"]
        rows.append(
            Row("9", title, AGENT, "fairness of the shares (Jain, 1 = equal)", "",
                [fairness] if fairness is not None else [],
                not_measured=None if fairness is not None else "never all four copying at one poll")
        )  # fmt: skip
    return rows
