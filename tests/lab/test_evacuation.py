"""Host evacuation (issue 24): one ``POST /v1/host/evacuations`` moves three VMs off hostA onto hostB.

Judged from outside the agent where it can be: where each VM runs (libvirt on both hosts), from which volume
and with what bytes (``qemu-img compare`` against the source image), how many of the evacuation's moves were
incoming on hostB at once (its libvirt: a domain arriving is paused there until the switchover), and what
hostA sent on its wire against its budget (its namespace's ``eth0``). The guests are bare (no kernel, next to
no CPU under TCG): what moves is their disks' data and their memory.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
from agentapi import disk_sources, images_identical
from labtools import Guest, Lab, LabHost

from labkit.agents import agent_client
from labkit.bodies import evacuation_destination
from labkit.linkcount import LinkCounter

pytestmark = pytest.mark.lab
MiB = 1024 * 1024
BUDGET_MIB = 48
INCOMING = 2  # the destination takes two of the evacuation's moves at once; the third waits
VMS = 3


def paused_here(host: LabHost, names: set[str]) -> int:
    """How many of ``names`` libvirt on ``host`` holds paused (a migration arriving)."""
    rows = host.virsh("list", "--all", check=False).splitlines()[2:]
    return sum(1 for r in rows if (p := r.split()) and len(p) >= 3 and p[1] in names and p[2] == "paused")


async def test_evacuation_moves_every_vm_within_the_destinations_limit(
    lab_agents: Lab, make_guest: Callable[..., Guest], host_budget: Callable[..., Any]
) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guests = [make_guest(bare=True, fill_mib=96, disk_size_mib=256, memory_mib=96) for _ in range(VMS)]
    names = {g.name for g in guests}
    sources = {g.uuid: disk_sources(src, g.name)["vda"] for g in guests}
    # The source's own concurrency is not what limits here: the destination's incomingMigrations is.
    await host_budget(outgoing=BUDGET_MIB, outgoingMigrations=VMS)
    body = {
        "vms": [g.uuid for g in guests],
        "destinations": [evacuation_destination(dst, INCOMING)],
        "migrateVm": {"downTime": 1000},
    }
    views: list[dict[str, Any]] = []
    most_arriving = 0
    with LinkCounter(src) as link:
        began = time.monotonic()
        async with agent_client(lab_agents, src) as agent:
            created = await agent.request("POST", "v1", "host", "evacuations", json_body=body)
            evacuation = created["evacuationUuid"]
            deadline = began + 300
            while time.monotonic() < deadline:
                view = await agent.request("GET", "v1", "host", "evacuations", evacuation)
                views.append(view)
                most_arriving = max(most_arriving, paused_here(dst, names))
                if view["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                    break
                await asyncio.sleep(0.25)
        ended = time.monotonic()

    final = views[-1]
    assert final["state"] == "SUCCEEDED", [(v["vmUuid"], v["state"], v["error"]) for v in final["vms"]]
    progress = final["progress"]
    assert (progress["vmsDone"], progress["vmsSucceeded"], progress["percent"]) == (VMS, VMS, 100.0)
    assert [v["verdict"] for v in final["vms"]] == [True] * VMS

    # Where the VMs run, read from libvirt on both hosts, and what they run from.
    for guest in guests:
        assert guest.where() == {"hostB": "running"}, (guest.name, guest.where())
        moved = disk_sources(dst, guest.name)["vda"]
        assert moved.startswith(str(dst.root("ps1").path)), moved
        assert images_identical(sources[guest.uuid], moved), (sources[guest.uuid], moved)

    # The destination's limit held (its own libvirt, never more than two arriving at once) and was used
    # (the agent's view: two of the moves ran together while the third waited).
    print(f"most arriving on hostB at once: {most_arriving}")
    assert 1 <= most_arriving <= INCOMING
    assert any(v["progress"]["vmsRunning"] == INCOMING and v["progress"]["vmsWaiting"] for v in views), [
        v["progress"] for v in views
    ]
    assert all(v["progress"]["vmsRunning"] <= INCOMING for v in views)
    # Progress never went backwards: VMs done and bytes done only grow.
    for earlier, later in itertools.pairwise(views):
        assert later["progress"]["vmsDone"] >= earlier["progress"]["vmsDone"]
        assert later["progress"]["bytesDone"] >= earlier["progress"]["bytesDone"], (earlier, later)

    # What hostA sent, by its own counters, within the host's budget past the first window.
    windows = link.windows(began, ended)
    print(
        f"evacuated {VMS} VMs in {ended - began:.1f} s; hostA sent "
        f"{(link.samples[-1][1] - link.samples[0][1]) / MiB:.0f} MiB; windows (end s, MiB/s): "
        + ", ".join(f"{t:.1f}: {r / MiB:.1f}" for t, r in windows)
    )
    assert all(r <= 1.05 * BUDGET_MIB * MiB for _, r in windows), windows
