"""The lab itself: two real hypervisors, and test guests whose acknowledged writes can be verified."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from labtools import Guest, Lab, lab_cli

from labkit.layout import GUESTS_DIR, TMP_DIR

pytestmark = pytest.mark.lab

RECORD_BASE = 1 << 20  # record N of a disk: the 512-byte sector at RECORD_BASE + N * 512 (labkit/records.py)


def _chain(top: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", top],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return list(json.loads(out))


def _disks(xml: str) -> dict[str, ET.Element]:
    return {d.find("target").get("dev"): d for d in ET.fromstring(xml).findall("./devices/disk")}  # type: ignore[union-attr]


def test_two_hosts_each_with_its_own_libvirtd_name_and_uuid(lab: Lab) -> None:
    assert [h.name for h in lab.hosts] == ["hostA", "hostB"]
    assert len({h.uuid for h in lab.hosts}) == 2
    for host in lab.hosts:
        if lab.raw["transport"] == "tls":  # virsh from the root namespace with the operator's certificate
            pki = lab.raw["clientPki"]
            assert host.libvirt_uri == f"qemu+tls://{host.address}/system?pkipath={pki}"
            assert host.agent_url.startswith("https://")
        else:
            assert host.libvirt_uri == f"qemu+tcp://{host.address}/system"
        assert host.virsh("hostname").strip() == host.name
        capabilities = ET.fromstring(host.virsh("capabilities"))
        assert capabilities.findtext("./host/uuid") == host.uuid


def test_storage_roots_have_uuids_and_the_small_one_is_small(lab: Lab) -> None:
    uuids = [root.uuid for host in lab.hosts for root in host.storage]
    assert len(set(uuids)) == len(uuids)
    for host in lab.hosts:
        assert {"ps1", "ps2", "small"} <= {root.name for root in host.storage}
        for root in host.storage:
            assert root.path.is_dir()
        small = os.statvfs(host.root("small").path)
        assert small.f_blocks * small.f_frsize == 64 << 20


def test_agent_config_describes_the_host(lab: Lab) -> None:
    from agent.config import RbdStorageConfig, load_config

    for host in lab.hosts:
        config = load_config(host.agent_config)
        assert config.host_uuid == host.uuid
        assert config.listen_address == host.address
        assert config.migration_address == host.address
        assert config.read_token() == lab.token
        roots = {(r.uuid, str(r.kind), r.path) for r in config.storage if not isinstance(r, RbdStorageConfig)}
        assert roots == {(r.uuid, r.kind, r.path) for r in host.storage}
        pools = [r for r in config.storage if isinstance(r, RbdStorageConfig)]
        ceph = lab.ceph
        assert [(rbd.uuid, rbd.pool, rbd.user, rbd.secret_uuid) for rbd in pools] == [
            (ceph.storage_uuid, ceph.pool, ceph.user, ceph.secret_uuid),
            (ceph.storage2_uuid, ceph.pool2, ceph.user, ceph.secret_uuid),
        ]  # both pools of the one cluster, one secret
        assert all(rbd.monitors == ceph.monitors for rbd in pools)


def test_link_down_cuts_a_host_off_and_up_restores_it(lab: Lab) -> None:
    host = lab.host("hostB")
    port = 16514 if lab.raw["transport"] == "tls" else 16509  # libvirtd's TLS or plain TCP listener

    def reachable() -> bool:
        try:
            with socket.create_connection((host.address, port), timeout=1.5):
                return True
        except OSError:
            return False

    assert reachable()
    lab.link("down", host.name)
    try:
        assert not reachable()
    finally:
        lab.link("up", host.name)
    assert reachable()


def test_guest_with_data_volume_and_snapshots_acks_writes_and_verifies(
    lab: Lab, make_guest: Callable[..., Guest]
) -> None:
    guest = make_guest(data_volumes=1, snapshots=2)
    host = lab.host("hostA")
    assert "Persistent:     yes" in host.virsh("dominfo", guest.name)
    xml = host.virsh("dumpxml", guest.name)
    assert ET.fromstring(xml).get("type") == "qemu"
    disks = _disks(xml)
    assert sorted(disks) == ["vda", "vdb"]
    for dev, disk in disks.items():
        top = disk.find("source").get("file")  # type: ignore[union-attr]
        serial = disk.findtext("serial")
        assert serial is not None and len(serial) == 32
        assert Path(top).name == f"{uuid.UUID(serial)}.qcow2", dev
        assert Path(top).parent == host.root("ps1").path
        chain = _chain(top)
        assert len(chain) == 3, f"{dev}: {[c['filename'] for c in chain]}"
        for layer in chain:
            assert int(layer["actual-size"]) >= 4 << 20  # type: ignore[call-overload]

    before = guest.acks()
    after = guest.wait_for_acks(more=30)
    assert set(after) == {"vda", "vdb"}
    result = guest.verify()
    assert result.ok, result.output
    assert result.disks == 2
    assert result.records >= sum(after.values())
    # verify paused the guest and resumed it: it keeps writing.
    guest.wait_for_acks(more=5)
    assert sum(before.values()) < sum(after.values())


def test_verify_names_an_overwritten_acknowledged_record(lab: Lab, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_volumes=1, snapshots=1)
    guest.wait_for_acks(more=10)
    host = lab.host("hostA")
    host.virsh("destroy", guest.name)  # stopped: the image can be opened for writing
    assert guest.verify().ok
    top = _disks(host.virsh("dumpxml", guest.name))["vdb"].find("source").get("file")  # type: ignore[union-attr]
    seq = 3  # written before the snapshot: it lives in the lower layer, the overwrite lands in the top one
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {RECORD_BASE + seq * 512} 512", top],
        capture_output=True, check=True,
    )  # fmt: skip
    result = guest.verify()
    assert not result.ok
    assert f"record vdb #{seq} " in result.output, result.output
    assert "corrupt" in result.output


def test_guest_survives_a_reset_without_overwriting_acknowledged_records(
    lab: Lab, make_guest: Callable[..., Guest]
) -> None:
    guest = make_guest()
    before = guest.wait_for_acks(more=20)
    lab.host("hostA").virsh("reset", guest.name)
    time.sleep(1)
    guest.wait_for_acks(more=20)
    console = (GUESTS_DIR / guest.name / "console.log").read_text()
    assert console.count("KSA-BOOT ") == 2
    result = guest.verify()
    assert result.ok, result.output
    assert result.records > before["vda"]


def test_verify_follows_the_guest_to_the_other_host(lab: Lab, make_guest: Callable[..., Guest]) -> None:
    """Migrate by hand (virsh, whole disks copied to hostB's ps2): acks from both hosts are checked there."""
    guest = make_guest(data_volumes=1)
    before = guest.wait_for_acks(more=10)
    src, dst = lab.host("hostA"), lab.host("hostB")
    xml = ET.fromstring(src.virsh("dumpxml", "--migratable", guest.name))
    for disk in xml.findall("./devices/disk"):
        source = disk.find("source")
        assert source is not None
        target = dst.root("ps2").path / Path(source.get("file", "")).name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), "1024M"], check=True)
        source.set("file", str(target))
    dest_xml = TMP_DIR / f"{guest.name}.xml"
    dest_xml.write_text(ET.tostring(xml, encoding="unicode"))
    src.virsh(
        "migrate", "--live", "--p2p", "--copy-storage-all", "--persistent", "--undefinesource",
        "--xml", str(dest_xml), guest.name, dst.libvirt_uri,
    )  # fmt: skip
    dest_xml.unlink()
    assert guest.where() == {"hostB": "running"}
    after = guest.wait_for_acks(more=10)
    result = guest.verify()
    assert result.ok, result.output
    assert "on hostB" in result.output
    # The console file kept what hostA's QEMU wrote (append='on'): acks from both hosts are counted.
    assert all(after[dev] >= before[dev] + 10 for dev in before)
    assert result.records >= sum(after.values())


def test_the_console_stays_whole_across_a_migration_past_2_mib(
    lab: Lab, make_guest: Callable[..., Guest]
) -> None:
    """A long-lived guest's console passes 2 MiB. With libvirt's default stdio_handler ("logd") the
    destination's virtlogd rolled it over at its first write after the switchover (console.log.0 and a new
    console.log), and the guest looked silent to everything that reads console.log after a mark (issue 21:
    bench/safety/rotation.py). The lab lets QEMU write the file itself: the guest's lines go on in it."""
    guest = make_guest(disk_size_mib=256)
    guest.wait_for_acks(more=5)
    console = GUESTS_DIR / guest.name / "console.log"
    with console.open("a") as out:  # lines no reader parses, to 2 MiB + 8 KiB
        out.write(
            ("ksa-pad " + "." * 55 + "\n") * ((2 * 1024 * 1024 + 8192 - console.stat().st_size) // 64 + 1)
        )
    src, dst = lab.host("hostA"), lab.host("hostB")
    xml = ET.fromstring(src.virsh("dumpxml", "--migratable", guest.name))
    for disk in xml.findall("./devices/disk"):
        source = disk.find("source")
        assert source is not None
        target = dst.root("ps2").path / Path(source.get("file", "")).name
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), "256M"], check=True)
        source.set("file", str(target))
    dest_xml = TMP_DIR / f"{guest.name}.xml"
    dest_xml.write_text(ET.tostring(xml, encoding="unicode"))
    src.virsh(
        "migrate", "--live", "--p2p", "--copy-storage-all", "--persistent", "--undefinesource",
        "--xml", str(dest_xml), guest.name, dst.libvirt_uri,
    )  # fmt: skip
    dest_xml.unlink()
    assert guest.where() == {"hostB": "running"}
    guest.wait_for_acks(more=10)  # reads console.log whole; refuses one that was rolled over
    assert not list(console.parent.glob("console.log.*")), "the console was rolled over"
    assert console.stat().st_size > 2 * 1024 * 1024


def test_guest_dirties_memory_at_the_requested_rate(lab: Lab, make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(dirty_mib_s=8)
    guest.wait_for_acks(more=5)
    console = GUESTS_DIR / guest.name / "console.log"
    deadline = time.monotonic() + 60
    while "KSA-DIRTY 8 MiB/s" not in console.read_text():
        assert time.monotonic() < deadline, "the guest never started dirtying memory"
        time.sleep(0.5)
    host = lab.host("hostA")
    host.virsh("domdirtyrate-calc", guest.name, "--seconds", "2")
    time.sleep(2.5)
    stats = host.virsh("domstats", "--dirtyrate", guest.name)
    rates = [int(line.split("=")[1]) for line in stats.splitlines() if "megabytes_per_second" in line]
    assert rates, stats
    rate = rates[0]
    assert rate >= 4, stats


def test_agent_kill_and_start(lab_agents: Lab) -> None:
    lab_agents.agent("kill", "hostB")
    status = json.loads(lab_cli("status", "--json").stdout)
    assert not next(h for h in status["hosts"] if h["name"] == "hostB")["health"]["agent"]
    lab_agents.agent("start", "hostB")
    status = json.loads(lab_cli("status", "--json").stdout)
    assert next(h for h in status["hosts"] if h["name"] == "hostB")["health"]["agent"]


def test_libvirtd_restart_restarts_only_libvirtd(lab_agents: Lab, make_guest: Callable[..., Guest]) -> None:
    """The fault tests' libvirtd restart (`scripts/lab libvirtd restart`): the host's libvirtd gets a new
    pid; its guest's QEMU, its agent and the other host's daemons stay the same processes; the guest writes
    on."""
    guest = make_guest(host="hostB")

    def pids() -> dict[str, dict[str, int]]:
        status = json.loads(lab_cli("status", "--json").stdout)
        return {h["name"]: h["pids"] for h in status["hosts"]}

    def qemu_pid() -> int:
        found = subprocess.run(["pgrep", "-f", f"guest={guest.name},"], capture_output=True, text=True)
        return int(found.stdout.split()[0])

    before, qemu = pids(), qemu_pid()
    lab_cli("libvirtd", "restart", "hostB")
    after = pids()
    assert after["hostB"]["libvirtd"] != before["hostB"]["libvirtd"]
    assert after["hostB"]["agent"] == before["hostB"]["agent"]
    assert after["hostA"] == before["hostA"]
    assert qemu_pid() == qemu
    assert lab_agents.host("hostB").virsh("domstate", guest.name).strip() == "running"
    guest.wait_for_acks(more=5)
