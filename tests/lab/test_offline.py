"""Offline moves: the storage of a shut-off VM, on the same host and to another host (issue 5)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
from agentapi import disk_sources, images_identical, migrate, qemu_img_chain
from labtools import Guest, Lab
from test_crosshost import _qsd_processes, files_under

from labkit.bodies import migration_body, to_host_body

pytestmark = pytest.mark.lab


def stop(guest: Guest, lab: Lab) -> None:
    guest.wait_for_acks(10)
    lab.host(guest.host).virsh("destroy", guest.name)  # pulled plug: acked writes were fsync'd


async def test_offline_same_host_keeps_chains_and_boots(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    guest = make_guest(data_volumes=1, snapshots=2)
    stop(guest, lab_agents)
    before = disk_sources(host, guest.name, inactive=True)
    old = {t: qemu_img_chain(p) for t, p in before.items()}
    run = await migrate(
        lab_agents,
        host,
        guest.uuid,
        migration_body(host.root("ps2").uuid, withDataVolumes=True, withSnapshots=True),
    )
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.task["details"]["engine"] == "offline"
    after = disk_sources(host, guest.name, inactive=True)
    for target, chain in old.items():
        new = qemu_img_chain(after[target])
        assert len(new) == 3 and all(
            os.path.dirname(x["filename"]) == str(host.root("ps2").path) for x in new
        )
        for a, b in zip(chain, new, strict=True):
            assert images_identical(a["filename"], b["filename"])
    host.virsh("start", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output


async def test_offline_to_other_host_boots_there(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(data_volumes=1, snapshots=1)
    stop(guest, lab_agents)
    old = {t: qemu_img_chain(p) for t, p in disk_sources(src, guest.name, inactive=True).items()}
    run = await migrate(
        lab_agents,
        src,
        guest.uuid,
        to_host_body(dst, withDataVolumes=True, withSnapshots=True, bandwidth=200),
    )
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert guest.where() == {"hostB": "shut off"}, "defined on hostB only"
    after = disk_sources(dst, guest.name, inactive=True)
    for target, chain in old.items():
        new = qemu_img_chain(after[target])
        assert len(new) == len(chain) == 2
        for upper, lower in itertools.pairwise(new):
            assert upper["full-backing-filename"] == lower["filename"]
        for a, b in zip(chain, new, strict=True):
            assert images_identical(a["filename"], b["filename"])
    assert not _qsd_processes()
    dst.virsh("start", guest.name)
    guest.wait_for_acks(10)
    result = guest.verify()
    assert result.ok, result.output


async def test_offline_flatten_to_other_host(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    src, dst = lab_agents.host("hostA"), lab_agents.host("hostB")
    guest = make_guest(snapshots=1)
    stop(guest, lab_agents)
    src_files = files_under(src)
    run = await migrate(lab_agents, src, guest.uuid, to_host_body(dst))
    assert run.state == "SUCCEEDED", run.task.get("error")
    (path,) = disk_sources(dst, guest.name, inactive=True).values()
    assert len(qemu_img_chain(path)) == 1
    assert files_under(src) == src_files, "the temporary flattened copy must be gone"
    dst.virsh("start", guest.name)
    guest.wait_for_acks(5)
    assert guest.verify().ok
