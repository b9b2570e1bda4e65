"""The phase-by-fault matrix (issue 15): every fault, struck in every phase the task reports, same host and
cross host, each case asserting that the task's verdict is the truth.

A case starts a move of a writing guest (root + data volume, one snapshot each, chains kept; across hosts
with `auto`, the default, and with `precopy`), strikes where ``PLACES`` says (the phase the task reports;
PREPARING and same-host SWITCHING are held open a few seconds by the agent's phase-holds seam,
``agent/tasks/holds.py``; the cross-host SWITCHING strike lands the moment libvirt pauses the guest for its
switchover), heals as the fault says, follows the task to its end, checks the invariant (``assert_truth``),
and then that the ending is the cell's own (``EXPECTED``: a SUCCEEDED that became FAILED, or another error
code, fails the case):
- the VM runs on exactly one host;
- SUCCEEDED <=> it runs on the destination from the new volumes (chains where planned, live and persistent
  definitions agree); FAILED/CANCELLED <=> on the source from its original volumes, the destination's files
  removed; or AGENT.VM_LOCATION_UNKNOWN with nothing removed anywhere;
- every acknowledged guest write is there, and the guest still writes;
- no block job or migration job is left, and the destination agent keeps no record of the migration;
- the final callback (a local recorder standing in for the management plane) says what the task says.

`scripts/faults [--quick] [--out DIR]` runs it and writes the table; `./scripts/test` runs the quick subset
(marker ``quick``: one case per fault and per phase).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from agentapi import start
from faultkit import (
    FINAL,
    Before,
    assert_no_loss,
    assert_settled,
    finish,
    guest_files,
    kill_agent,
    lab_restored,
    small_guest,
    start_agent,
)
from labtools import Guest, Lab, LabHost, restart_libvirtd

from labkit.agents import task_view
from labkit.bodies import migration_body, to_host_body
from labkit.layout import host_by_name
from labkit.mgmtplane import CallbackRecorder

pytestmark = pytest.mark.lab
__all__ = ["lab_restored"]  # the autouse fixture, imported so that it applies here

#: Seconds the agent holds a task in a short phase so that the strike lands in it.
HOLD_S = 5.0
#: Held phases. CONVERGING is not held (a hold would freeze the steering the strike must meet): the memory
#: phase of a 256 MiB guest at 16 MiB/s lasts 16 s or more, and the strike lands 1 s into it.
SHORT_PHASES = ("PREPARING", "SWITCHING")
#: Seconds into CONVERGING before the strike: the convergence controller has taken its first samples.
CONVERGING_STRIKE_S = 1.0
#: Task timeout of every case: a case whose migration cannot finish after its fault still ends.
CASE_TIMEOUT_S = 240


@dataclass(frozen=True)
class Case:
    engine: str  # samehost | crosshost
    phase: str  # PREPARING | COPYING | CONVERGING | SWITCHING
    fault: str  # see FAULTS
    strategy: str = "auto"  # cross host: auto (the default) | precopy; same host has no memory phase
    quick: bool = False

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.engine, self.phase, self.fault, self.strategy)

    @property
    def id(self) -> str:
        tail = f"-{self.strategy}" if self.engine == "crosshost" else ""
        return f"{self.engine}-{self.phase.lower()}-{self.fault}{tail}"


FAULTS = {
    "src-agent-kill": "the source agent SIGKILLed, started again 2 s later",
    "dst-agent-kill-30s": "the destination agent SIGKILLed, started again 30 s later",
    "dst-agent-kill-until-end": "the destination agent SIGKILLed, started again only once the task ended",
    "src-libvirtd-restart": "the source libvirtd restarted",
    "dst-libvirtd-restart": "the destination libvirtd restarted",
    "link-cut-20s": "the destination's network link cut for 20 s, then healed",
}
SAMEHOST_FAULTS = ("src-agent-kill", "src-libvirtd-restart")
PHASES = ("PREPARING", "COPYING", "CONVERGING", "SWITCHING")
STRATEGIES = ("auto", "precopy")
#: Where each strike lands:
#: - PREPARING, same-host SWITCHING: the agent holds the task HOLD_S after it reported the phase;
#: - COPYING: as soon as the task reports it (lower layers and disk mirrors at the capped rate);
#: - CONVERGING: CONVERGING_STRIKE_S into the memory phase, while the agent steers it;
#: - cross-host SWITCHING: the moment libvirt pauses the guest on the source for the switchover (its
#:   lifecycle reads "paused, migration"), while the task still says CONVERGING; the agent reports
#:   SWITCHING only once libvirt's call returned.
PLACES = {
    "PREPARING": "held 5 s after the task reported PREPARING",
    "COPYING": "as the task reported COPYING",
    "CONVERGING": "1 s into CONVERGING, the agent steering",
    "SWITCHING": "cross host: libvirt pausing the guest for the switchover; same host: held 5 s in SWITCHING",
}

#: What each cell must end with: the task's state and error code, as ``assert_truth`` words it. A change from
#: one to another (SUCCEEDED -> FAILED, or another code) fails the case. Where two endings are both true to
#: the fault (a race that the fault itself decides), the cell lists both and says why in ``RACES``.
EXPECTED: dict[tuple[str, str, str, str], tuple[str, ...]] = {}
RACES: dict[tuple[str, str, str, str], str] = {}


def expect(
    engine: str,
    phase: str,
    fault: str,
    *outcomes: str,
    strategies: tuple[str, ...] = STRATEGIES,
    race: str = "",
) -> None:
    for strategy in strategies if engine == "crosshost" else ("auto",):
        EXPECTED[(engine, phase, fault, strategy)] = outcomes
        if race:
            RACES[(engine, phase, fault, strategy)] = race


# The source agent killed and started 2 s later: it resumes what libvirt still runs (a migration job) and
# fails what it cannot resume (a copy of lower layers it was streaming itself).
expect("crosshost", "PREPARING", "src-agent-kill", "SUCCEEDED")
expect("crosshost", "COPYING", "src-agent-kill", "FAILED AGENT.INTERRUPTED")
expect("crosshost", "CONVERGING", "src-agent-kill", "SUCCEEDED")
expect("crosshost", "SWITCHING", "src-agent-kill", "SUCCEEDED")
# The destination agent away for 30 s: prepare and the layer transfers need it; libvirt's migration does not,
# and the commit waits for it to come back.
expect("crosshost", "PREPARING", "dst-agent-kill-30s", "FAILED AGENT.PEER_UNREACHABLE")
expect(
    "crosshost",
    "COPYING",
    "dst-agent-kill-30s",
    "FAILED AGENT.TRANSFER_FAILED",
    "FAILED AGENT.PEER_UNREACHABLE",
    race="which call meets the dead agent first: a layer transfer (TRANSFER_FAILED) or a call to the agent "
    "itself (PEER_UNREACHABLE); both say the destination agent went away, and the VM stays on the source",
)
expect("crosshost", "CONVERGING", "dst-agent-kill-30s", "SUCCEEDED")
expect("crosshost", "SWITCHING", "dst-agent-kill-30s", "SUCCEEDED")
# The destination agent away until the task ended: the VM arrives, the destination cannot confirm.
expect("crosshost", "PREPARING", "dst-agent-kill-until-end", "FAILED AGENT.PEER_UNREACHABLE")
expect("crosshost", "COPYING", "dst-agent-kill-until-end", "FAILED AGENT.PEER_UNREACHABLE")
expect("crosshost", "CONVERGING", "dst-agent-kill-until-end", "SUCCEEDED (destination agent unconfirmed)")
expect("crosshost", "SWITCHING", "dst-agent-kill-until-end", "SUCCEEDED (destination agent unconfirmed)")
# The source libvirtd restarted: libvirt cancels a migration whose daemon restarted before the memory phase;
# past it the agent waits the outage out and reads where the VM went.
expect(
    "crosshost",
    "PREPARING",
    "src-libvirtd-restart",
    "FAILED AGENT.LIBVIRT_UNREACHABLE",
    "SUCCEEDED",
    race="whether this host's restarted libvirtd answers again before the agent next needs it (the restart "
    "takes 1-3 s of the 5 s hold): not yet, the task fails before any migration began; back, the move runs",
)
expect("crosshost", "COPYING", "src-libvirtd-restart", "FAILED AGENT.LIBVIRT_UNREACHABLE")
expect("crosshost", "CONVERGING", "src-libvirtd-restart", "SUCCEEDED")
expect("crosshost", "SWITCHING", "src-libvirtd-restart", "SUCCEEDED")
# The destination libvirtd restarted: it kills an incoming domain that had not finished arriving.
expect(
    "crosshost",
    "PREPARING",
    "dst-libvirtd-restart",
    "SUCCEEDED",
    "FAILED AGENT.MIGRATION_FAILED",
    race="whether the destination's restarted libvirtd answers again before the migration connects to it "
    "(the restart takes 1-3 s of the 5 s hold): back, the move runs as if nothing happened; not yet, libvirt "
    "cannot connect and the move fails with the VM on the source",
)
expect("crosshost", "COPYING", "dst-libvirtd-restart", "FAILED AGENT.MIGRATION_FAILED")
expect("crosshost", "CONVERGING", "dst-libvirtd-restart", "FAILED AGENT.MIGRATION_FAILED")
expect("crosshost", "SWITCHING", "dst-libvirtd-restart", "FAILED AGENT.MIGRATION_FAILED")
# The link cut for 20 s: prepare cannot reach the peer; the NBD mirrors ride a 20 s cut out; the memory
# stream does not (libvirt's keepalive ends it).
expect("crosshost", "PREPARING", "link-cut-20s", "FAILED AGENT.PEER_UNREACHABLE")
expect("crosshost", "COPYING", "link-cut-20s", "SUCCEEDED")
expect("crosshost", "CONVERGING", "link-cut-20s", "FAILED AGENT.MIGRATION_FAILED")
expect("crosshost", "SWITCHING", "link-cut-20s", "FAILED AGENT.MIGRATION_FAILED")
# Same host.
expect("samehost", "PREPARING", "src-agent-kill", "SUCCEEDED")
expect("samehost", "COPYING", "src-agent-kill", "FAILED AGENT.INTERRUPTED")
expect("samehost", "SWITCHING", "src-agent-kill", "FAILED AGENT.INTERRUPTED")
expect("samehost", "PREPARING", "src-libvirtd-restart", "SUCCEEDED")
expect("samehost", "COPYING", "src-libvirtd-restart", "SUCCEEDED")
expect("samehost", "SWITCHING", "src-libvirtd-restart", "SUCCEEDED")

#: One case per fault and per phase, the default strategy where it matters, the cheapest such set in the
#: full run's seconds (docs/reliability.md), so that `./scripts/test` stays within its budget.
QUICK = {
    ("crosshost", "CONVERGING", "dst-agent-kill-until-end", "auto"),
    ("crosshost", "SWITCHING", "src-agent-kill", "auto"),
    ("crosshost", "COPYING", "dst-agent-kill-30s", "auto"),
    ("samehost", "SWITCHING", "src-libvirtd-restart", "auto"),
    ("crosshost", "PREPARING", "dst-libvirtd-restart", "auto"),
    ("crosshost", "COPYING", "link-cut-20s", "auto"),
}


def all_cases() -> list[Case]:
    cases = []
    for strategy in STRATEGIES:
        for fault in FAULTS:
            for phase in PHASES:
                key = ("crosshost", phase, fault, strategy)
                cases.append(Case("crosshost", phase, fault, strategy, key in QUICK))
    for fault in SAMEHOST_FAULTS:
        for phase in PHASES:
            if phase != "CONVERGING":  # a same-host move has no memory phase
                key = ("samehost", phase, fault, "auto")
                cases.append(Case("samehost", phase, fault, "auto", key in QUICK))
    missing = [case.id for case in cases if case.key not in EXPECTED]
    assert not missing, f"cells without an expected outcome: {missing}"
    return cases


def _params() -> list[Any]:
    return [
        pytest.param(
            case, id=case.id, marks=[pytest.mark.matrix, *([pytest.mark.quick] if case.quick else [])]
        )
        for case in all_cases()
    ]


# -- the case's surroundings ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorder() -> Iterator[CallbackRecorder]:
    with CallbackRecorder() as server:
        yield server


def holds_file(host: LabHost) -> Path:
    return host.agent_config.parent / "state" / "phase-holds.json"


@contextlib.contextmanager
def held(host: LabHost, phase: str | None) -> Iterator[None]:
    """The agent on ``host`` holds its tasks for HOLD_S after entering ``phase`` (a short one; None: none)."""
    path = holds_file(host)
    if phase in SHORT_PHASES:
        path.write_text(json.dumps({phase: HOLD_S}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


async def wait_for_phase(lab: Lab, host: LabHost, task_uuid: str, phase: str, within: float = 180) -> None:
    """Until the task reports ``phase``; fails at once if it ends first or went past it."""
    order = [*PHASES, "VERIFYING"]
    deadline = time.monotonic() + within
    while True:
        view = await task_view(lab, host, task_uuid)
        state = view["state"]
        assert state not in FINAL, f"the task ended before {phase}: {state} {view['error']}"
        if state == phase:
            return
        if state in order and order.index(state) > order.index(phase):
            raise AssertionError(f"the task went past {phase} to {state} before the strike")
        assert time.monotonic() < deadline, f"the task never reported {phase} (stays {state})"
        await asyncio.sleep(0.05)


def incoming_record(host: LabHost, migration_id: str) -> Path | None:
    """The destination agent's record of an incoming migration, on its disk (None: it keeps none)."""
    path = host.agent_config.parent / "state" / "incoming" / f"{migration_id}.json"
    return path if path.exists() else None


# -- the faults ----------------------------------------------------------------------------------------------


class Strike:
    """One fault: ``hit`` when the phase is reported, ``heal_during`` runs alongside the task (restarts,
    link back), ``heal_after`` once the task ended."""

    def __init__(self, lab: Lab, fault: str, src: LabHost, dst: LabHost) -> None:
        self.lab, self.fault, self.src, self.dst = lab, fault, src, dst

    async def hit(self) -> None:
        f = self.fault
        if f == "src-agent-kill":
            kill_agent(self.lab, self.src)
        elif f.startswith("dst-agent-kill"):
            kill_agent(self.lab, self.dst)
        elif f == "src-libvirtd-restart":
            await asyncio.to_thread(restart_libvirtd, self.src)
        elif f == "dst-libvirtd-restart":
            await asyncio.to_thread(restart_libvirtd, self.dst)
        elif f == "link-cut-20s":
            self.lab.link("down", self.dst.name)
        else:
            raise AssertionError(f"unknown fault {f}")

    async def heal_during(self) -> None:
        f = self.fault
        if f == "src-agent-kill":
            await asyncio.sleep(2)
            await asyncio.to_thread(start_agent, self.lab, self.src)
        elif f == "dst-agent-kill-30s":
            await asyncio.sleep(30)
            await asyncio.to_thread(start_agent, self.lab, self.dst)
        elif f == "link-cut-20s":
            await asyncio.sleep(20)
            self.lab.link("up", self.dst.name)

    async def heal_after(self) -> None:
        if self.fault == "dst-agent-kill-until-end":
            await asyncio.to_thread(start_agent, self.lab, self.dst)


# -- the invariant -------------------------------------------------------------------------------------------


def assert_truth(
    lab: Lab, guest: Guest, before: Before, run_task: dict[str, Any], src: LabHost, dst: LabHost, root: Path
) -> str:
    """The verdict equals where the VM runs and from which volumes; returns a short outcome for the table."""
    state = run_task["state"]
    code = (run_task.get("error") or {}).get("code")
    where = guest.where()
    assert list(where.values()) == ["running"], f"the VM must run on exactly one host: {where}"
    if state == "SUCCEEDED":
        live = assert_settled(lab, guest, before, on=dst, root=root, layers=2)
        assert {v["installPath"] for v in run_task["inventory"]["volumes"] if v.get("moved", True)} >= set(
            live.values()
        ), run_task["inventory"]
        unconfirmed = "destinationAgent" in run_task["details"]
        return "SUCCEEDED" + (" (destination agent unconfirmed)" if unconfirmed else "")
    if code == "AGENT.VM_LOCATION_UNKNOWN":
        after = guest_files(lab, before.names)
        for key, names in before.files.items():
            assert names <= after[key], f"{key}: {names - after[key]} removed although the place is unknown"
        return f"{state} {code}"
    assert state in ("FAILED", "CANCELLED"), state
    assert_settled(lab, guest, before, on=src, root=None)
    return f"{state} {code}"


async def assert_callback(recorder: CallbackRecorder, task: dict[str, Any]) -> None:
    """The management plane was told exactly what the task says."""
    body = await recorder.final(task["taskUuid"], within=240)
    assert body["state"] == task["state"], (body["state"], task["state"])
    assert body["success"] == (task["state"] == "SUCCEEDED")
    assert (body["error"] or {}).get("code") == (task["error"] or {}).get("code")
    assert body["inventory"] == task["inventory"]


# -- the matrix ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(CASE_TIMEOUT_S + 600)
@pytest.mark.parametrize("case", _params())
async def test_verdict_is_the_truth(
    lab_agents: Lab, make_guest: Callable[..., Guest], recorder: CallbackRecorder, case: Case
) -> None:
    src = lab_agents.host("hostA")
    dst = src if case.engine == "samehost" else lab_agents.host("hostB")
    root = src.root("ps2") if case.engine == "samehost" else dst.root("ps1")
    # CONVERGING needs a memory phase that lasts: the guest dirties memory; the disks carry enough data for
    # COPYING to last several seconds at the capped rate.
    # Same host: 32 MiB per disk at 8 MiB/s keeps COPYING long enough to strike in; across hosts the memory
    # phase does that, and 16 MiB at 16 MiB/s keeps the cases short.
    fill, bandwidth = (32, 8) if case.engine == "samehost" else (16, 16)
    guest = small_guest(make_guest, data_volumes=1, snapshots=1, fill_mib=fill, dirty_mib_s=4)
    before = Before.take(lab_agents, src, guest)
    options: dict[str, Any] = dict(
        withDataVolumes=True,
        withSnapshots=True,
        bandwidth=bandwidth,
        downTime=500,
        timeout=CASE_TIMEOUT_S,
        callbackUrl=recorder.url(),
    )
    if case.engine == "crosshost":
        body = to_host_body(dst, strategy=case.strategy, **options)
    else:
        body = migration_body(root.uuid, **options)
    strike = Strike(lab_agents, case.fault, src, dst)
    started = time.monotonic()
    at_switchover = case.engine == "crosshost" and case.phase == "SWITCHING"
    with held(src, None if at_switchover else case.phase):
        task = await start(lab_agents, src, guest.uuid, body)
        if at_switchover:
            await wait_for_phase(lab_agents, src, task["taskUuid"], "CONVERGING")
            await wait_for_switchover(lab_agents, src, guest, task["taskUuid"])
        else:
            await wait_for_phase(lab_agents, src, task["taskUuid"], case.phase)
            if case.phase == "CONVERGING":
                await asyncio.sleep(CONVERGING_STRIKE_S)
        await strike.hit()
    healing = asyncio.ensure_future(strike.heal_during())
    try:
        run = await finish(lab_agents, src, task["taskUuid"], within_s=CASE_TIMEOUT_S + 300)
    finally:
        await healing
    await strike.heal_after()

    if case.engine == "crosshost":
        # The destination agent ends with no record of the migration: committed, or its files removed
        # (by the source's abort, or by its own reconciliation at start).
        deadline = time.monotonic() + 120
        while (record := incoming_record(dst, task["taskUuid"])) is not None:
            assert time.monotonic() < deadline, f"the destination still holds {record}"
            await asyncio.sleep(1)
    outcome = assert_truth(lab_agents, guest, before, run.task, src, dst, Path(root.path))
    await assert_callback(recorder, run.task)
    assert_no_loss(guest)
    record_row(case, outcome, time.monotonic() - started)
    expected = EXPECTED[case.key]
    assert outcome in expected, (
        f"{case.id}: the task ended {outcome!r}, the cell expects {' or '.join(expected)}"
        + (f" ({RACES[case.key]})" if case.key in RACES else "")
        + f"\nthe task's error: {json.dumps(run.task.get('error'))}\n"
        + task_story(task["taskUuid"], (src, dst))
    )


def task_story(task_uuid: str, hosts: tuple[LabHost, ...], lines: int = 40) -> str:
    """The agents' log lines that name the task (its last ``lines`` on each host): what a changed ending
    needs to be understood from CI's output alone."""
    story = []
    for host in dict.fromkeys(hosts):
        log = host_by_name(host.name).agent_log
        try:
            named = [line for line in log.read_text(errors="replace").splitlines() if task_uuid in line]
        except OSError as err:
            named = [f"(cannot read {log}: {err})"]
        story.append(f"--- {host.name} agent ({log}), {len(named)} lines naming the task:")
        story.extend(named[-lines:])
    return "\n".join(story)


async def wait_for_switchover(lab: Lab, host: LabHost, guest: Guest, task_uuid: str) -> None:
    """Until libvirt pauses the guest on ``host`` for the switchover (domain state paused, reason
    migration), polled every 10 ms over one libvirt connection; fails at once if the task ends first."""

    def watch(stop: threading.Event) -> bool:
        conn = libvirt.open(host.libvirt_uri)
        try:
            dom = conn.lookupByName(guest.name)
            while not stop.is_set():
                state, reason = dom.state()
                if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_MIGRATION:
                    return True
                if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
                    return False
                time.sleep(0.01)
            return False
        finally:
            conn.close()

    stop = threading.Event()
    watcher = asyncio.ensure_future(asyncio.to_thread(watch, stop))
    deadline = time.monotonic() + 180
    try:
        while not watcher.done():
            view = await task_view(lab, host, task_uuid)
            assert view["state"] not in FINAL, f"the task ended before the switchover: {view['state']}"
            assert time.monotonic() < deadline, (
                f"libvirt never paused the guest for the switchover ({view['state']})"
            )
            await asyncio.wait([watcher], timeout=0.5)
        assert watcher.result(), "the guest left the source without a switchover pause"
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await watcher


def record_row(case: Case, outcome: str, seconds: float) -> None:
    """One line of the table `scripts/faults` writes (KSA_FAULTS_TABLE names the file)."""
    path = os.environ.get("KSA_FAULTS_TABLE")
    if path:
        row = {
            "case": case.id,
            "fault": FAULTS[case.fault],
            "struck": PLACES[case.phase],
            "expected": " or ".join(EXPECTED[case.key]),
            "outcome": outcome,
            "seconds": round(seconds, 1),
        }
        with open(path, "a") as table:
            table.write(json.dumps(row) + "\n")
