"""Same-host live storage migration through the real agent, with the writing guest (issue 4)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from agentapi import (
    assert_progress_honest,
    disk_sources,
    images_identical,
    migrate,
    qemu_img_chain,
    start,
)
from labtools import Guest, Lab

from agent.client import ApiError
from labkit.bodies import migration_body

pytestmark = pytest.mark.lab
MiB = 1024 * 1024


def files_in(path: os.PathLike[str] | str) -> set[str]:
    return set(os.listdir(path))


async def test_keeps_chains_of_root_and_data_volumes(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest(data_volumes=2, snapshots=2)
    guest.wait_for_acks(10)
    before = disk_sources(host, guest.name)
    src_chains = {t: qemu_img_chain(p) for t, p in before.items()}
    assert all(len(chain) == 3 for chain in src_chains.values())

    run = await migrate(
        lab_agents, host, guest.uuid, migration_body(dst.uuid, withDataVolumes=True, withSnapshots=True)
    )

    assert run.state == "SUCCEEDED", run.task.get("error")
    assert run.states == ["PENDING", "PREPARING", "COPYING", "SWITCHING", "VERIFYING", "SUCCEEDED"]
    live, persistent = disk_sources(host, guest.name), disk_sources(host, guest.name, inactive=True)
    volumes = run.volumes()
    for target, chain in src_chains.items():
        new_top = live[target]
        assert os.path.dirname(new_top) == str(dst.path) and persistent[target] == new_top
        new_chain = qemu_img_chain(new_top)
        assert len(new_chain) == 3
        for old, new in zip(chain[1:], new_chain[1:], strict=True):
            assert os.path.dirname(new["filename"]) == str(dst.path)
            assert os.path.basename(new["filename"]) == os.path.basename(old["filename"])
            assert new["format"] == old["format"] and new["virtual-size"] == old["virtual-size"]
            assert images_identical(old["filename"], new["filename"]), "a lower layer differs from its source"
        assert new_chain[0]["full-backing-filename"] == new_chain[1]["filename"]
        assert volumes[target]["installPath"] == new_top
        assert volumes[target]["primaryStorageUuid"] == dst.uuid
        assert [b["installPath"] for b in volumes[target]["backingChain"]] == [
            c["filename"] for c in new_chain[1:]
        ]
    assert volumes["vda"]["type"] == "Root" and volumes["vdb"]["type"] == "Data"
    assert_progress_honest(run)
    # The source files stay for the management plane; the guest keeps writing on the new volumes.
    assert all(os.path.exists(p) for p in before.values())
    guest.wait_for_acks(20)
    result = guest.verify()
    assert result.ok, result.output
    assert result.records > 0 and result.disks == 3


async def test_flattens_without_snapshots(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest(data_volumes=1, snapshots=2)
    guest.wait_for_acks(10)
    run = await migrate(lab_agents, host, guest.uuid, migration_body(dst.uuid, withDataVolumes=True))
    assert run.state == "SUCCEEDED", run.task.get("error")
    for target, path in disk_sources(host, guest.name).items():
        chain = qemu_img_chain(path)
        assert len(chain) == 1, f"{target} still has a backing chain"
        assert os.path.dirname(path) == str(dst.path)
    guest.wait_for_acks(20)
    result = guest.verify()
    assert result.ok, result.output


async def test_root_only_leaves_data_volume(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    host = lab_agents.host("hostA")
    guest = make_guest(data_volumes=1)
    before = disk_sources(host, guest.name)
    run = await migrate(lab_agents, host, guest.uuid, migration_body(host.root("ps2").uuid))
    assert run.state == "SUCCEEDED", run.task.get("error")
    after = disk_sources(host, guest.name)
    assert os.path.dirname(after["vda"]) == str(host.root("ps2").path)
    assert after["vdb"] == before["vdb"]
    skipped = run.task["details"]["plan"]["skipped"]
    assert [s["target"] for s in skipped] == ["vdb"] and "withDataVolumes" in skipped[0]["reason"]
    assert guest.verify().ok


async def test_cancel_mid_copy_leaves_nothing(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    guest = make_guest(data_volumes=1, snapshots=1, fill_mib=64)
    before_files = files_in(dst.path)
    before = disk_sources(host, guest.name)
    run = await migrate(
        lab_agents,
        host,
        guest.uuid,
        migration_body(dst.uuid, withDataVolumes=True, withSnapshots=True, bandwidth=8),
        cancel_after=2.0,
    )
    assert run.state == "CANCELLED", run.task
    assert "COPYING" in run.states and "CANCELLING" in run.states
    assert disk_sources(host, guest.name) == before
    assert disk_sources(host, guest.name, inactive=True) == before
    assert files_in(dst.path) == before_files, "destination files left behind"
    assert (
        "No current block job"
        in host.virsh("blockjob", guest.name, "vda", check=False) + "No current block job"
    )
    guest.wait_for_acks(10)
    assert guest.verify().ok


async def test_destination_too_small_fails_cleanly(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    host = lab_agents.host("hostA")
    small = host.root("small")
    guest = make_guest(data_volumes=1, fill_mib=48)
    before = disk_sources(host, guest.name)
    before_files = files_in(small.path)
    run = await migrate(lab_agents, host, guest.uuid, migration_body(small.uuid, withDataVolumes=True))
    assert run.state == "FAILED"
    assert run.task["error"]["code"] == "AGENT.NO_SPACE", run.task["error"]
    assert disk_sources(host, guest.name) == before
    assert files_in(small.path) == before_files
    assert guest.verify().ok


@pytest.mark.parametrize("escape", ["/etc/ksa-escape.qcow2", "../ps1/x.qcow2", "link/x.qcow2"])
async def test_path_outside_root_is_refused_before_any_write(
    lab_agents: Lab, make_guest: Callable[..., Guest], escape: str
) -> None:
    host = lab_agents.host("hostA")
    dst = host.root("ps2")
    link = dst.path / "link"
    if not link.is_symlink():
        link.symlink_to("/tmp")
    guest = make_guest()
    before_files = files_in(dst.path)
    target = escape if escape.startswith("/") else str(dst.path / escape)
    body = migration_body(
        dst.uuid, volumes=[{"installPath": disk_sources(host, guest.name)["vda"], "dstInstallPath": target}]
    )
    with pytest.raises(ApiError) as err:
        await start(lab_agents, host, guest.uuid, body)
    assert err.value.status == 400
    assert err.value.error["code"] == "AGENT.PATH_OUTSIDE_ROOT"
    assert err.value.error["field"] == "volumes[0].dstInstallPath"
    assert files_in(dst.path) == before_files
    assert not os.path.exists("/tmp/x.qcow2") and not os.path.exists("/etc/ksa-escape.qcow2")
    link.unlink()


async def test_unknown_storage_uuid_is_a_400_naming_the_field(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    host = lab_agents.host("hostA")
    guest = make_guest()
    with pytest.raises(ApiError) as err:
        await start(lab_agents, host, guest.uuid, migration_body("0e4f3c1a-5b6d-4e7f-8a9b-0c1d2e3f4a5b"))
    assert err.value.status == 400
    assert err.value.error["field"] == "primaryStorageMigrateVm.dstPrimaryStorageUuid"


@pytest.mark.rates
async def test_bandwidth_is_one_budget_for_real_bytes(
    lab_agents: Lab, make_guest: Callable[..., Guest]
) -> None:
    """Three thin disks (1 GiB virtual, ~64 MiB of data each) under one 40 MiB/s cap: the aggregate rate of
    real bytes holds the cap (libvirt alone would charge holes and give each disk the whole cap)."""
    host = lab_agents.host("hostA")
    guest = make_guest(data_volumes=2, fill_mib=64)
    cap = 40
    run = await migrate(
        lab_agents,
        host,
        guest.uuid,
        migration_body(host.root("ps2").uuid, withDataVolumes=True, bandwidth=cap),
    )
    assert run.state == "SUCCEEDED", run.task.get("error")
    # No pause before the copy (issue 24): the guest's write rates (hot disks, issue 16) were read from the
    # counters the agent sampled before the request, over a second or more.
    held = run.task["details"]["guestWrites"]
    assert held["heldSeconds"] == 0 and held["spanSeconds"] >= 1.0, held
    copying = [(t, v["progress"]["bytesDone"]) for t, v in run.samples if v["state"] == "COPYING"]
    # The rate is taken from the last sample before the first byte moved.
    first = next(i for i, (_, b) in enumerate(copying) if b > 0)
    copying = copying[max(0, first - 1) :]
    assert len(copying) > 8, "the copy was too short to measure"
    (t0, b0), (t1, b1) = copying[0], copying[-1]
    rate = (b1 - b0) / (t1 - t0) / MiB
    total = run.task["progress"]["bytesTotal"] / MiB
    assert total > 150, f"only {total:.0f} MiB moved"
    assert 0.85 * cap <= rate <= 1.10 * cap, f"aggregate {rate:.1f} MiB/s against a cap of {cap}"
    # Never far above the cap over any window of about 5 s.
    for i, (ta, ba) in enumerate(copying):
        later = [(tb, bb) for tb, bb in copying[i:] if tb - ta >= 5]
        if later:
            tb, bb = later[0]
            assert (bb - ba) / (tb - ta) / MiB <= 1.10 * cap
    assert guest.verify().ok
