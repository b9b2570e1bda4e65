"""The lab's pure parts: record format and acks (the verifier's rules), module load order, agent.toml."""

from __future__ import annotations

import os
import signal
import sys
import tomllib
from pathlib import Path

import pytest

from agent.config import parse_config
from labkit import agentctl, hostsetup, layout, records
from labkit.image import module_load_order
from labkit.layout import HOSTS
from labkit.state import LabState
from labkit.sysutil import pid_matches

BOOT = "0123456789abcdef0123456789abcdef"
OTHER_BOOT = "f" * 32


def _disk(recs: dict[int, bytes]) -> records.Reader:
    def read(offset: int, length: int) -> bytes:
        seq = (offset - records.RECORD_BASE) // records.RECORD_SIZE
        return recs.get(seq, b"\0" * length)

    return read


def test_acks_are_parsed_per_disk_and_cut_lines_are_ignored() -> None:
    console = [
        f"KSA-BOOT {BOOT} disks: vda vdb",
        f"KSA-ACK vda 0 {BOOT}\r",
        f"KSA-ACK vdb 0 {BOOT}",
        f"KSA-ACK vda 1 {BOOT[:10]}[    3.1] kernel noise",  # cut by kernel output: not an ack
        f"KSA-ACK vda 1 {BOOT}",
        f"noise KSA-ACK vdb 1 {BOOT}",
    ]
    acks = records.parse_acks(console)
    assert {dev: a.count for dev, a in acks.items()} == {"vda": 2, "vdb": 2}
    assert acks["vda"].highest == 1


def test_an_intact_record_verifies_and_damage_is_named() -> None:
    good = records.encode_record("vdb", 7, BOOT)
    assert len(good) == 512
    assert records.record_problem(good, "vdb", 7, BOOT) is None
    assert "missing" in str(records.record_problem(b"\0" * 512, "vdb", 7, BOOT))
    flipped = good.replace(b"vdb 7", b"vdb 8")
    assert "checksum" in str(records.record_problem(flipped, "vdb", 7, BOOT))
    assert "corrupt" in str(records.record_problem(b"Z" * 512, "vdb", 7, BOOT))
    other_disk = records.encode_record("vda", 7, BOOT)
    assert "wrong record" in str(records.record_problem(other_disk, "vdb", 7, BOOT))
    newer = records.encode_record("vdb", 7, OTHER_BOOT)
    assert "overwritten" in str(records.record_problem(newer, "vdb", 7, BOOT))
    garbage_after = good[:-1] + b"x"
    assert "garbage" in str(records.record_problem(garbage_after, "vdb", 7, BOOT))


def test_verify_disk_counts_records_and_reports_the_first_problem_in_order() -> None:
    acks = records.parse_acks(f"KSA-ACK vdb {n} {BOOT}" for n in range(5))["vdb"]
    recs = {n: records.encode_record("vdb", n, BOOT) for n in range(5)}
    assert records.verify_disk("vdb", acks, _disk(recs)).records == 5
    del recs[3]
    recs[1] = b"Z" * 512
    result = records.verify_disk("vdb", acks, _disk(recs))
    assert result.records == 3
    assert result.problems[0].startswith("record vdb #1 ")
    assert "#3" in result.problems[1]


def test_a_record_acknowledged_twice_by_different_boots_is_a_loss() -> None:
    acks = records.parse_acks([f"KSA-ACK vda 0 {BOOT}", f"KSA-ACK vda 0 {OTHER_BOOT}"])["vda"]
    result = records.verify_disk("vda", acks, _disk({0: records.encode_record("vda", 0, OTHER_BOOT)}))
    assert result.problems and "lost" in result.problems[0]


def test_filler_of_each_layer_is_checked() -> None:
    fill = records.FillExtent(layer=1, offset=1000, length=16, pattern=0x42)
    acks = records.DiskAcks("vda")
    ok = records.verify_disk("vda", acks, lambda off, n: b"\x42" * n, [fill])
    assert ok.fill_extents == 1 and not ok.problems
    bad = records.verify_disk("vda", acks, lambda off, n: b"\x42" * 3 + b"\0" * (n - 3), [fill])
    assert "byte 1003" in bad.problems[0] and "layer 1" in bad.problems[0]


def _fake_module(path: Path, depends: str) -> Path:
    path.write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")
    return path


def test_modules_load_after_their_dependencies(tmp_path: Path) -> None:
    mods = [
        _fake_module(tmp_path / "virtio.ko", "virtio_ring"),
        _fake_module(tmp_path / "virtio_ring.ko", ""),
        _fake_module(tmp_path / "virtio_blk.ko", "virtio,virtio_ring"),
        _fake_module(tmp_path / "virtio_pci.ko", "virtio_ring,virtio_pci_modern_dev,virtio"),
        _fake_module(tmp_path / "virtio_pci_modern_dev.ko", ""),
    ]
    order = [m.name for m in module_load_order(mods)]
    for module, dep in [("virtio", "virtio_ring"), ("virtio_blk", "virtio"), ("virtio_pci", "virtio")]:
        assert order.index(f"{dep}.ko") < order.index(f"{module}.ko")


def test_lab_agent_config_is_accepted_by_the_agent() -> None:
    state = LabState.fresh()
    for host in HOSTS:
        text = agentctl.config_text(host, state.hosts[host.name], state.ceph)
        config = parse_config(tomllib.loads(text), host.name)
        assert config.host_uuid == state.hosts[host.name].uuid
        assert config.listen_address == host.address
        kinds = [str(entry.kind) for entry in config.storage]
        assert kinds == ["file", "file", "file", "block", "rbd", "rbd"]
        # The shared pools: one uuid each, everywhere.
        assert [e.uuid for e in config.storage[-2:]] == [state.ceph.storage_uuid, state.ceph.storage2_uuid]


def test_lab_configs_are_tls_unless_the_lab_is_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent, libvirtd and QEMU configs of a TLS lab, of an insecure one, and of a plain twin."""

    monkeypatch.setattr(layout, "INSECURE_FILE", tmp_path / "insecure")
    monkeypatch.setattr(hostsetup, "allowed_dns", lambda: ("O=lab,CN=hostA", "O=lab,CN=operator"))
    state = LabState.fresh()
    host = HOSTS[0]
    secure = parse_config(
        tomllib.loads(agentctl.config_text(host, state.hosts[host.name], state.ceph)), host.name
    )
    assert not secure.insecure_transport and secure.peer_uri() == f"qemu+tls://{host.address}/system"
    assert (secure.tls_cert, secure.tls_ca) == (
        Path("/etc/pki/libvirt/servercert.pem"),
        Path("/etc/pki/CA/cacert.pem"),
    )
    assert host.agent_url.startswith("https://") and "pkipath=" in host.libvirt_uri
    libvirtd = hostsetup.libvirtd_conf(host, state.hosts[host.name])
    assert (
        "listen_tls = 1" in libvirtd and "listen_tcp = 0" in libvirtd and 'auth_tcp = "none"' not in libvirtd
    )
    assert 'tls_allowed_dn_list = ["O=lab,CN=hostA", "O=lab,CN=operator"]' in libvirtd
    assert "migrate_tls_x509_verify = 1" in hostsetup.qemu_conf(host)
    twin_text = agentctl.config_text(host, state.hosts[host.name], state.ceph, twin_port=7071)
    twin = parse_config(tomllib.loads(twin_text), host.name)
    assert twin.insecure_transport and twin.port == 7071 and twin.tls_cert is None
    assert twin.peer_uri() == f"qemu+tls://{host.address}/system" and twin.state_dir != secure.state_dir

    (tmp_path / "insecure").write_text("")
    plain = parse_config(
        tomllib.loads(agentctl.config_text(host, state.hosts[host.name], state.ceph)), host.name
    )
    assert plain.insecure_transport and plain.peer_uri() == f"qemu+tcp://{host.address}/system"
    assert host.agent_url.startswith("http://") and host.libvirt_uri == f"qemu+tcp://{host.address}/system"
    assert 'auth_tcp = "none"' in hostsetup.libvirtd_conf(host, state.hosts[host.name])
    assert "tls" not in hostsetup.qemu_conf(host)


def test_a_spawned_program_is_judged_by_its_own_command_line(tmp_path: Path) -> None:
    """posix_spawn returns while the child's exec is still setting up (its /proc cmdline reads empty, most
    times for a script: 187 of 200 here); the lab's spawn waits for the program's own command line, so a
    check by command line right after it sees the live process (it took a serving agent for a dead one)."""
    script = tmp_path / "ksa-spawn-probe"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(5)\n")
    script.chmod(0o755)
    for _ in range(200):  # without the wait, 3 of 200 such checks here took the live child for a dead one
        pid = os.posix_spawn(str(script), [str(script)], {}, setsid=True)
        try:
            hostsetup._wait_exec_settled(pid)
            assert pid_matches(pid, "ksa-spawn-probe")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
