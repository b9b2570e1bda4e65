"""Issue 6: on a guest whose dirtying is bound by its CPU, `auto` throttles and completes within `downTime`
where `precopy` does not.

The guest (`--dirty-cpu-bound`) rewrites a 64 MiB tmpfs buffer as fast as its one TCG vCPU goes: about
50-65 MiB/s of writes on this lab (measured, noisy machine), as fast as the CPU goes elsewhere. So the link
is set from the rate measured before each case, 1.5 x slower (40 MiB/s here; 3 x for the `precopy` case,
``PRECOPY_DIRTY_OVER_LINK``). Every pre-copy pass then leaves the whole buffer dirty again: `precopy` with
300 ms of downtime runs to its timeout (55-62 passes in 90 s, 2 of 2). QEMU's auto-converge throttle slows
the vCPU; from 30-50 % on, the guest dirties less than the link carries and the passes shrink: `auto`
completed in 15-27 s with 47-241 ms of downtime (6 of 6, throttle 40-80 %).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from agentapi import Run, disk_sources, migrate
from labtools import Guest, Lab, dirty_speed_mib_s
from test_crosshost import assert_stayed_on_source, files_under

from labkit.bodies import to_host_body

pytestmark = pytest.mark.lab

#: The one `precopy` case that must run to its timeout: it proves both that pre-copy cannot finish the guest
#: `auto` finishes here (15-27 s) and that a timed-out move rolls back (until 2026-12-07 test_crosshost.py
#: proved the same ending again on another guest, 55 s more per run).
PRECOPY_TIMEOUT_S = 40

DOWNTIME_MS = 300
#: `auto` lets QEMU's throttle rise to 90 % only when that fits the request's timeout (about 14 passes of
#: the whole working set). With 90 s, CI's loaded machine (the guest measured at 21.8 MiB/s, a 14 MiB/s link,
#: 5.7 s a pass) gave up after three passes as the request asked: "will not converge". The link follows the
#: machine's speed, so the timeout leaves room for the slowest link the premise allows (8 MiB/s of dirtying
#: over 1.5: 5.3 MiB/s, 15 s a pass, 300 s to reach 90 %). A run takes 30-80 s.
AUTO_TIMEOUT_S = 360
#: The guest dirties this many times faster than the link carries (the original lab run: 50-65 MiB/s of
#: dirtying over 40 MiB/s).
DIRTY_OVER_LINK = 1.5
#: For the case that shows `precopy` cannot finish: the guest dirties less while it migrates (under TCG,
#: QEMU's dirty tracking slows its first write to every page after each sync), and on a quiet machine that
#: was enough: measured at 95.9 MiB/s before the move, precopy over a 63 MiB/s link converged in about 10 s
#: (the final check of 2026-12-06). Three times the link keeps the premise whatever the machine's load.
PRECOPY_DIRTY_OVER_LINK = 3.0


def explain(run: Run) -> str:
    """The error and every decision of the controller: what a failed case must show in CI's log."""
    decisions = run.task.get("details", {}).get("convergence", {}).get("decisions", [])
    lines = [f"{run.state}: {run.task.get('error')}"] + [f"- {d.get('message')}" for d in decisions]
    return "\n".join(lines)


def _cpu_bound_guest(make_guest: Callable[..., Guest], over: float = DIRTY_OVER_LINK) -> tuple[Guest, int]:
    """The CPU-bound guest and a link it out-dirties by DIRTY_OVER_LINK. How fast a TCG guest dirties is this
    machine's CPU speed, so the link is set from the speed measured now (at half or twice today's CPU speed
    the premise, and so the test's meaning, stays the same)."""
    guest = make_guest(dirty_cpu_bound=True, working_set_mib=64, memory_mib=256)
    guest.wait_for_acks(5)
    rate = dirty_speed_mib_s(guest)  # the guest's own marks, not QEMU's estimate (which saturates)
    assert rate >= 8, (
        f"premise not met: the CPU-bound guest dirties only {rate:.1f} MiB/s (the lab, not the agent)"
    )
    return guest, max(4, int(rate / over))


@pytest.mark.timeout(AUTO_TIMEOUT_S + 120)
async def test_auto_throttles_a_cpu_bound_guest_to_completion(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    # A TCG guest that dirties this hard has died right after an `auto` switchover (docs/reliability.md,
    # "Agent kills and the `auto` strategy"): such a death fails the case with the kernel's report.
    guest, bandwidth = _cpu_bound_guest(make_guest)
    guest.mark()
    run = await migrate(
        lab_agents,
        src,
        guest.uuid,
        to_host_body(dst, bandwidth=bandwidth, downTime=DOWNTIME_MS, strategy="auto", timeout=AUTO_TIMEOUT_S),
        within_s=AUTO_TIMEOUT_S + 60,
    )
    assert run.state == "SUCCEEDED", explain(run)
    assert run.task["error"] is None
    details = run.task["details"]
    assert run.task["downtimeMs"] is not None and run.task["downtimeMs"] <= DOWNTIME_MS, details
    assert "downtimeExceeded" not in details
    decisions = details["convergence"]["decisions"]
    assert decisions[0]["message"].startswith("strategy auto"), decisions
    # The controller decided (downtime, convergence) under QEMU's auto-converge throttle: the figures of its
    # decisions carry the throttle it saw.
    throttles = [d.get("throttle_pct", 0) for d in decisions]
    assert max(throttles) >= 20, f"no decision was taken under the throttle: {decisions}"
    assert details["convergence"]["postcopy"] is False
    assert guest.where() == {"hostB": "running"}
    guest.wait_for_acks(10, timeout=60)  # alive on the destination, not only defined there
    result = guest.verify()
    assert result.ok, result.output


async def test_precopy_cannot_finish_the_same_guest(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest, bandwidth = _cpu_bound_guest(make_guest, PRECOPY_DIRTY_OVER_LINK)
    before, dst_files = disk_sources(src, guest.name), files_under(dst)
    started = time.monotonic()
    run = await migrate(
        lab_agents,
        src,
        guest.uuid,
        to_host_body(
            dst, bandwidth=bandwidth, downTime=DOWNTIME_MS, strategy="precopy", timeout=PRECOPY_TIMEOUT_S
        ),
        within_s=240,
    )
    assert run.state == "FAILED", run.task
    assert run.task["error"]["code"] == "AGENT.TIMEOUT", run.task["error"]
    assert time.monotonic() - started >= PRECOPY_TIMEOUT_S - 5  # it ran to its timeout, no verdict before
    assert "CONVERGING" in run.states, run.states  # the timeout struck pre-copy's passes, not the disks
    assert run.task["downtimeMs"] is None
    assert_stayed_on_source(guest, src, dst, before, dst_files)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output
