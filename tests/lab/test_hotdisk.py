"""Hot disks (issue 16): a guest that writes a disk faster than the task's budget.

`auto` moves it with a write-blocking mirror and says when the guest's own writes took the task over its cap;
`precopy` keeps a background mirror and fails early with the figures, the VM on its source volumes. Every
premise (the guest's real write rate, the same data on the quiet guest) is measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from agentapi import Run, disk_sources, migrate, qemu_img_chain
from labtools import Guest, Lab, LabHost

from agent.migration.mirrors import hotdisk
from agent.migration.mirrors.hotdisk import BUFFER_SLACK
from labkit.bodies import migration_body, to_host_body
from labkit.mgmtplane import CallbackRecorder

pytestmark = pytest.mark.lab
MiB = 1024 * 1024
HOT_MIB_S = 20  # asked of the guest; what it really writes sets the cap (2.5 x under it)
#: The quiet guest writes its region for this long first, and at least once over it (a guest slower than
#: asked still ends with all of it written, as the hot one has), then only its records.
QUIET_WRITE_S = 10
#: Quiet guests too overshoot a few hundred ms under TCG on a busy machine (394 ms with 300 set, measured).
#: And the hot guest's memory stream gets what its write-blocked disk leaves of the cap: 4.0 MiB/s in a clean
#: run of 2026-12-07, where the guest still re-dirtied 5.7 MiB a pass at 90 % throttle (its memory checker,
#: its writer's buffers): `auto` rightly gave up on 1000 ms (1422 needed). The case is about the disk.
DOWNTIME_MS = 2000


@pytest.fixture
def recorder() -> Iterator[CallbackRecorder]:
    with CallbackRecorder() as server:
        yield server


def write_rate_mib_s(host: LabHost, guest: Guest, dev: str, seconds: float = 4.0) -> float:
    """The guest's write rate on one disk, from libvirt's block statistics."""

    def written() -> int:
        out = host.virsh("domblkstat", guest.name, dev)
        return next(int(line.split()[2]) for line in out.splitlines() if " wr_bytes " in line)

    first, t0 = written(), time.monotonic()
    time.sleep(seconds)
    return (written() - first) / (time.monotonic() - t0) / MiB


async def wait_quiet(guest: Guest, within: float = 120) -> None:
    """Until the guest's region writer stopped (it wrote its region once or more: the same data)."""
    deadline = time.monotonic() + within
    while "KSA-HOTSTOP" not in guest.console():
        assert time.monotonic() < deadline, "the quiet guest's writer did not stop"
        await asyncio.sleep(0.5)


def cap_for(rate_mib_s: float) -> int:
    """The task's cap for a guest measured writing ``rate_mib_s``: it writes at least 2.5 x the cap. The
    machine is shared (other labs' TCG guests): the guest's real rate, not the one asked, sets the case."""
    cap = int(rate_mib_s / 2.5)
    assert cap >= 2, f"premise: the guest writes only {rate_mib_s:.1f} MiB/s (asked {HOT_MIB_S})"
    return cap


def assert_background_within_cap(samples: list[dict[str, Any]], cap: int, mirrors: int) -> None:
    """The background copy's rate samples (one a second) hold the cap: their median within 1.1 x, and their
    bytes over the whole copy within 1.1 x cap x time once one 16 MiB mirror buffer per disk is set aside
    (QEMU lets a buffer go at once: single seconds measured 12 and 25 MB/s at caps of 4 and 7 MiB/s)."""
    rates = [r["backgroundBytesPerSecond"] for r in samples]
    seconds = sum(r["seconds"] for r in samples)
    moved = sum(r["backgroundBytesPerSecond"] * r["seconds"] for r in samples)
    assert rates and statistics.median(rates) <= 1.1 * cap * MiB, rates
    assert moved - mirrors * BUFFER_SLACK <= 1.1 * cap * MiB * seconds, (moved, seconds, rates)


def allocated_mib(path: str) -> float:
    return sum(int(layer["actual-size"]) for layer in qemu_img_chain(path)[:1]) / MiB


def copy_seconds(run: Run) -> float:
    """From the first COPYING to the last sample: the copy and the switch, as the task saw them."""
    started = next(t for t, view in run.samples if view["state"] == "COPYING")
    return run.samples[-1][0] - started


# It judges the background copy's rate from a copy of about 3 s (three one-second samples): beside the other
# lab, one late tick made the median 7.0 MB/s against a cap of 6 MiB/s (2026-12-08), so it runs alone.
@pytest.mark.rates
async def test_samehost_auto_moves_a_hot_disk_and_says_it_went_over_the_cap(
    lab_agents: Lab, make_guest: Callable[..., Guest], recorder: CallbackRecorder
) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    hot = make_guest(data_volumes=1, disk_write_mib_s=HOT_MIB_S)
    # The quiet guest writes the same region once, then only its records: the same data, a quiet disk.
    quiet = make_guest(data_volumes=1, disk_write_mib_s=HOT_MIB_S, disk_write_seconds=QUIET_WRITE_S)
    await wait_quiet(quiet)
    hot.wait_for_acks(10)
    hot_rate = write_rate_mib_s(host, hot, "vda")
    quiet_rate = write_rate_mib_s(host, quiet, "vda")
    cap = cap_for(hot_rate)
    assert quiet_rate < 1.0, f"premise: the quiet guest writes {quiet_rate:.1f} MiB/s"
    hot_src, quiet_src = disk_sources(host, hot.name), disk_sources(host, quiet.name)
    hot_data, quiet_data = allocated_mib(hot_src["vda"]), allocated_mib(quiet_src["vda"])
    assert abs(hot_data - quiet_data) <= 0.15 * quiet_data, (hot_data, quiet_data)

    body = {"withDataVolumes": True, "bandwidth": cap, "strategy": "auto"}
    quiet_run = await migrate(lab_agents, host, quiet.uuid, migration_body(dst.uuid, **body))
    assert quiet_run.state == "SUCCEEDED", quiet_run.task.get("error")
    hot_body = migration_body(dst.uuid, callbackUrl=recorder.url(), **body)
    hot_run = await migrate(lab_agents, host, hot.uuid, hot_body)
    assert hot_run.state == "SUCCEEDED", hot_run.task.get("error")

    # Moved and pivoted, both disks, in at most twice the time of the quiet disk.
    for guest, before in ((hot, hot_src), (quiet, quiet_src)):
        live = disk_sources(host, guest.name)
        assert set(live) == {"vda", "vdb"}
        assert all(os.path.dirname(p) == str(dst.path) for p in live.values()), live
        assert disk_sources(host, guest.name, inactive=True) == live
        assert all(os.path.exists(p) for p in before.values())
    ratio = copy_seconds(hot_run) / copy_seconds(quiet_run)
    assert ratio <= 2.0, f"hot {copy_seconds(hot_run):.1f} s against quiet {copy_seconds(quiet_run):.1f} s"

    details = hot_run.task["details"]
    # Seen: the disk's write rate and its mode, the decision in the log of decisions.
    assert details["disks"]["vda"]["mode"] == "write-blocking"
    assert details["disks"]["vda"]["guestWriteBytesPerSecond"] >= 1.5 * cap * MiB
    assert details["disks"]["vdb"]["mode"] == "background"
    assert any(d.get("disk") == "vda" and "write-blocking" in d["message"] for d in details["decisions"])
    assert quiet_run.task["details"]["disks"]["vda"]["mode"] == "background"
    # The background copy honours the cap (rate samples of the task, taken each second).
    assert_background_within_cap(details["copyRates"], cap, 2)
    # Never over the budget silently: the guest's own writes crossed at its pace, and the result says so.
    over = details["overBudget"]
    assert over["realBytesPerSecond"] > 1.1 * cap * MiB
    assert over["writeBlocking"] == ["vda"]
    assert over["guestWriteBytesPerSecond"]["vda"] >= 1.5 * cap * MiB
    callback = await recorder.final(hot_run.task["taskUuid"], within=30)
    assert callback["success"] is True and callback["overBudget"] == over
    assert "overBudget" not in quiet_run.task["details"]

    for guest in (hot, quiet):
        guest.wait_for_acks(10)
        result = guest.verify()
        assert result.ok, result.output


async def test_samehost_precopy_fails_early_with_the_figures(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest(snapshots=1, disk_write_mib_s=HOT_MIB_S)
    guest.wait_for_acks(10)
    cap = cap_for(write_rate_mib_s(host, guest, "vda"))
    before = disk_sources(host, guest.name)
    dst_before = set(os.listdir(dst.path))
    timeout = 300
    run = await migrate(
        lab_agents,
        host,
        guest.uuid,
        migration_body(dst.uuid, withSnapshots=True, bandwidth=cap, strategy="precopy", timeout=timeout),
    )
    assert run.state == "FAILED"
    error = run.task["error"]
    assert error["code"] == "AGENT.CONVERGENCE_FAILED", error
    assert "vda" in error["description"] and "strategy auto" in error["details"]
    figures = error["extra"]
    assert figures["disk"] == "vda"
    assert figures["guestWriteBytesPerSecond"] >= 1.5 * cap * MiB
    assert figures["shareBytesPerSecond"] == cap * MiB
    assert figures["budgetNeededBytesPerSecond"] > figures["guestWriteBytesPerSecond"]
    assert copy_seconds(run) < timeout / 5, "not early"
    assert run.task["details"]["disks"]["vda"]["trend"] == "losing"
    assert run.task["details"]["disks"]["vda"]["mode"] == "background"
    # The VM stays on its source volumes; what the task made is gone.
    assert disk_sources(host, guest.name) == before
    assert disk_sources(host, guest.name, inactive=True) == before
    assert set(os.listdir(dst.path)) == dst_before
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output


async def test_crosshost_auto_migrates_a_hot_disk_in_write_blocking_mode(
    lab_agents: Lab, make_guest: Callable[..., Guest], recorder: CallbackRecorder
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    hot = make_guest(data_volumes=1, snapshots=1, disk_write_mib_s=HOT_MIB_S)
    quiet = make_guest(
        data_volumes=1, snapshots=1, disk_write_mib_s=HOT_MIB_S, disk_write_seconds=QUIET_WRITE_S
    )
    await wait_quiet(quiet)
    hot.wait_for_acks(10)
    hot_rate = write_rate_mib_s(src, hot, "vda")
    quiet_rate = write_rate_mib_s(src, quiet, "vda")
    cap = cap_for(hot_rate)
    assert quiet_rate < 1.0, f"premise: the quiet guest writes {quiet_rate:.1f} MiB/s"
    src_chains = {t: qemu_img_chain(p) for t, p in disk_sources(src, hot.name).items()}
    assert all(len(chain) == 2 for chain in src_chains.values())

    body = {"withDataVolumes": True, "withSnapshots": True, "bandwidth": cap, "downTime": DOWNTIME_MS}
    for guest in (hot, quiet):
        guest.mark()  # a kernel death after the switchover fails the case with its report (labtools)
    quiet_run = await migrate(lab_agents, src, quiet.uuid, to_host_body(dst, timeout=600, **body))
    assert quiet_run.state == "SUCCEEDED", quiet_run.task.get("error")
    hot_run = await migrate(
        lab_agents, src, hot.uuid, to_host_body(dst, callbackUrl=recorder.url(), timeout=600, **body)
    )
    assert hot_run.state == "SUCCEEDED", hot_run.task.get("error")
    assert hot.where() == {"hostB": "running"} and quiet.where() == {"hostB": "running"}
    assert hot_run.task["downtimeMs"] is not None and hot_run.task["downtimeMs"] <= DOWNTIME_MS
    ratio = copy_seconds(hot_run) / copy_seconds(quiet_run)
    assert ratio <= 2.0, f"hot {copy_seconds(hot_run):.1f} s against quiet {copy_seconds(quiet_run):.1f} s"

    # Chains kept, data volume included, at the destination.
    live = disk_sources(dst, hot.name)
    assert set(live) == {"vda", "vdb"}
    for target, path in live.items():
        assert os.path.dirname(path) == str(dst.root("ps1").path)
        chain = qemu_img_chain(path)
        assert len(chain) == 2 and os.path.basename(chain[1]["filename"]) == os.path.basename(
            src_chains[target][1]["filename"]
        )

    details = hot_run.task["details"]
    assert details["diskMode"]["mode"] == "write-blocking" and "vda" in details["diskMode"]["hot"]
    # Measured by the agent before the migration, after the quiet guest's move: on a loaded machine the guest
    # writes less than when the case measured it (8.2 MiB/s against over 17.5 in CI on 2026-12-07), so the
    # figure is held to what makes a disk hot (half its share of the cap, two disks), not to the case's own.
    share = cap / 2
    hot_rate_seen = details["diskMode"]["hot"]["vda"]
    assert hot_rate_seen >= hotdisk.WRITE_BLOCKING_AT * share * MiB, (hot_rate_seen, hot_rate, cap)
    assert details["disks"]["vda"]["mode"] == details["disks"]["vdb"]["mode"] == "write-blocking"
    assert "diskMode" not in quiet_run.task["details"]
    assert_background_within_cap(details["copyRates"], cap, 2)
    # Each guest write now waits for the other host: the guest may slow under the cap (measured: 20 MiB/s
    # asked, about 4.4 on a loaded machine). Over the cap by more than 10 % or not, the result says which.
    callback = await recorder.final(hot_run.task["taskUuid"], within=30)
    assert callback["success"] is True
    # The rule (README, "overBudget"): over when the real bytes beat 1.1 x the cap, one buffer per mirror
    # aside. The buffers matter on a short copy (CI 2026-12-07: 1.1 x crossed by their share alone, no note).
    real = details["budget"]
    seconds = real["realBytes"] / max(real["realBytesPerSecond"], 1)
    aside = hotdisk.BUFFER_SLACK * 2 / seconds
    if real["realBytesPerSecond"] > hotdisk.OVER_BUDGET * cap * MiB + aside:
        over = details["overBudget"]
        assert over["writeBlocking"] == ["vda", "vdb"] and over["guestWriteBytesPerSecond"]["vda"] > 0
        assert callback["overBudget"] == over
    elif real["realBytesPerSecond"] <= hotdisk.OVER_BUDGET * cap * MiB:
        assert "overBudget" not in details and "overBudget" not in callback
    else:
        assert callback.get("overBudget") == details.get("overBudget")

    for guest in (hot, quiet):
        guest.wait_for_acks(10)
        result = guest.verify()
        assert result.ok, result.output


async def test_crosshost_precopy_fails_early_with_the_figures(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(snapshots=1, disk_write_mib_s=HOT_MIB_S)
    guest.wait_for_acks(10)
    cap = cap_for(write_rate_mib_s(src, guest, "vda"))
    before = disk_sources(src, guest.name)
    timeout = 300
    run = await migrate(
        lab_agents,
        src,
        guest.uuid,
        to_host_body(
            dst, withSnapshots=True, bandwidth=cap, strategy="precopy", downTime=300, timeout=timeout
        ),
    )
    assert run.state == "FAILED"
    error = run.task["error"]
    assert error["code"] == "AGENT.CONVERGENCE_FAILED", error
    assert error["extra"]["disk"] == "vda"
    assert error["extra"]["guestWriteBytesPerSecond"] >= 1.5 * cap * MiB
    assert error["extra"]["budgetNeededBytesPerSecond"] > error["extra"]["guestWriteBytesPerSecond"]
    assert copy_seconds(run) < timeout / 5, "not early"
    assert guest.where() == {"hostA": "running"}
    assert disk_sources(src, guest.name) == before
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output
