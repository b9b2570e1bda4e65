"""The installer and the unit under a real systemd: a Debian 12 container (debootstrap, cached) booted with
systemd-nspawn, ``scripts/install`` run inside it, then the service is checked through systemctl, journalctl
and its own API on the container's loopback.

The tests share one container and run in file order: install (unbooted) and boot, then restart, upgrade,
uninstall. The first run builds the cached root (about 2 minutes, needs the Debian mirror); later runs take
about a minute. Nothing here skips: a container that cannot be built or booted is a failure.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nspawn import (
    REPO,
    SRC_IN_CONTAINER,
    WHEELS_IN_CONTAINER,
    Container,
    build_agent_wheel,
    cached_root,
    copy_project,
    wheelhouse,
)

from agent import pki

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

SERVICE = "kvm-storage-agent.service"
HOST_UUID = "3f2d0c6a-8d1e-4f4b-9a51-6c1de0a7b001"
STORAGE_UUID = "3f2d0c6a-8d1e-4f4b-9a51-6c1de0a7b0aa"
STORAGE_PATH = "/srv/ksa/primary"
SECOND_UUID = "3f2d0c6a-8d1e-4f4b-9a51-6c1de0a7b0bb"
SECOND_PATH = "/srv/ksa/secondary"
INSTALL = f"{SRC_IN_CONTAINER}/scripts/install"
TOKEN_FILE = "/etc/kvm-storage-agent/token"
CONFIG_FILE = "/etc/kvm-storage-agent/agent.toml"
JOURNAL_FILE = "/var/lib/kvm-storage-agent/journal.sqlite"
VM_UUID = "3f2d0c6a-8d1e-4f4b-9a51-6c1de0a7b0f1"
VM_DISK = f"{STORAGE_PATH}/vm1-root.qcow2"
#: A VM that libvirt knows but that is not running: a migration request for it is accepted, then fails.
#: A running VM (TCG, no OS: SeaBIOS is enough for block copy) whose disk the restart test moves.
VM2_UUID = "3f2d0c6a-8d1e-4f4b-9a51-6c1de0a7b0f2"
VM2_DISK = f"{STORAGE_PATH}/vm2-root.qcow2"
VM_XML = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/><serial>{name}-root</serial></disk>
  </devices>
</domain>
"""
#: The host's cgroup v1 controllers are read-only inside nspawn: libvirt must not try to use them (test
#: environment only; on a real host libvirt manages the VMs' cgroups as usual).
QEMU_CONF = "\ncgroup_controllers = [ ]\n"

_HTTP = """
import json, sys, urllib.error, urllib.request
method, url, token, body = sys.argv[1:5]
headers = {"Content-Type": "application/json"}
if token:
    headers["Authorization"] = "Bearer " + token
data = body.encode() if body else None
request = urllib.request.Request(url, data=data, method=method, headers=headers)
try:
    with urllib.request.urlopen(request, timeout=10) as resp:
        print(json.dumps({"status": resp.status, "body": json.loads(resp.read())}))
except urllib.error.HTTPError as err:
    print(json.dumps({"status": err.code, "body": json.loads(err.read() or b"null")}))
"""


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    """Installed while not booted (as on a fresh image), then booted; removed with its processes."""
    root = cached_root()
    wheels = wheelhouse()
    box = Container(root)
    try:
        copy_project(box.path(SRC_IN_CONTAINER))
        inside_wheels = box.path(WHEELS_IN_CONTAINER)
        inside_wheels.mkdir(parents=True)
        for wheel in wheels.glob("*.whl"):
            (inside_wheels / wheel.name).write_bytes(wheel.read_bytes())
        agent_wheel = build_agent_wheel(inside_wheels, wheels)
        out = box.run_unbooted(
            INSTALL,
            "--wheelhouse",
            WHEELS_IN_CONTAINER,
            "--from-wheel",
            f"{WHEELS_IN_CONTAINER}/{agent_wheel.name}",
            "--storage",
            f"{STORAGE_UUID}={STORAGE_PATH}",
            "--storage",
            f"{SECOND_UUID}={SECOND_PATH}",
            "--host-uuid",
            HOST_UUID,
            "--insecure-transport",  # this container's API is checked over plain HTTP on loopback
        )
        assert "starts at the next boot" in out, out
        with box.path("/etc/libvirt/qemu.conf").open("a") as conf:
            conf.write(QEMU_CONF)
        box.boot()
        define_vm(box, "ksa-vm1", VM_UUID, VM_DISK)
        yield box
    finally:
        # A guest without an OS ignores ACPI shutdown: libvirt-guests would make power-off wait for it.
        if box.init_pid is not None:
            for vm in ("ksa-vm2", "demo1"):
                box.exec("virsh", "destroy", vm, check=False)
        box.close()


def define_vm(box: Container, name: str, vm_uuid: str, disk: str, data_mib: int = 0) -> None:
    box.exec("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G")
    if data_mib:
        box.exec("qemu-io", "-c", f"write -P 0xab 0 {data_mib}M", disk)
    box.path(f"/root/{name}.xml").write_text(VM_XML.format(name=name, uuid=vm_uuid, disk=disk))
    box.exec("virsh", "-q", "define", f"/root/{name}.xml")


def api(box: Container, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    """One HTTP call to the agent on the container's loopback; returns ``{"status", "body"}``."""
    payload = "" if body is None else json.dumps(body)
    url = f"http://127.0.0.1:7070{path}"
    out = box.exec_net(sys.executable, "-c", _HTTP, method, url, token or "", payload)
    return json.loads(out)


def token_of(box: Container) -> str:
    return box.path(TOKEN_FILE).read_text().strip()


def show(box: Container, *props: str) -> dict[str, str]:
    out = box.exec("systemctl", "show", SERVICE, *(f"-p{p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_healthy(box: Container, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = api(box, "GET", "/v1/health")
            if reply["status"] == 200:
                return reply["body"]
        except Exception:
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, "the agent does not answer /v1/health"
        time.sleep(0.5)


def logs(box: Container) -> str:
    return box.exec("journalctl", "-u", SERVICE, "--no-pager", "-o", "cat")


def test_service_is_active_and_answers_health(container: Container) -> None:
    assert container.exec("systemctl", "is-active", SERVICE).strip() == "active"
    assert container.exec("systemctl", "is-enabled", SERVICE).strip() == "enabled"
    props = show(container, "Type", "NotifyAccess", "WatchdogUSec", "KillMode", "Restart", "NRestarts")
    assert props == {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogUSec": "30s",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "NRestarts": "0",
    }
    health = wait_healthy(container)
    assert health["status"] == "ok" and health["hostUuid"] == HOST_UUID
    # The real libvirtd in the container (socket-activated) is what the agent connected to.
    assert container.exec("systemctl", "is-active", "libvirtd.service").strip() == "active"
    host = api(container, "GET", "/v1/host", token=token_of(container))
    assert host["status"] == 200
    roots = [(s["uuid"], s["path"]) for s in host["body"]["storage"]]
    assert roots == [(STORAGE_UUID, STORAGE_PATH), (SECOND_UUID, SECOND_PATH)]
    assert api(container, "GET", "/v1/host", token="wrong")["status"] == 401
    # The token file is root's alone.
    assert container.exec("stat", "-c", "%U %a", TOKEN_FILE).split() == ["root", "600"]


def test_journal_shows_the_agents_log_lines(container: Container) -> None:
    text = logs(container)
    assert "kvm-storage-agent starting on 0.0.0.0:7070" in text, text
    assert f"host {HOST_UUID}" in text
    assert "systemd watchdog: pinging every 7.5 s" in text  # WATCHDOG_USEC reached the agent
    assert "listening; ready" in text
    assert token_of(container) not in text


def create_failing_task(box: Container) -> str:
    """A task that fails fast (the VM is not running) and stays in the journal."""
    task_uuid = str(uuid.uuid4())
    body = {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": STORAGE_UUID}, "taskUuid": task_uuid}
    reply = api(box, "POST", f"/v1/vms/{VM_UUID}/storage-migrations", body, token_of(box))
    assert reply["status"] == 202, reply
    deadline = time.monotonic() + 30
    while True:
        task = api(box, "GET", f"/v1/tasks/{task_uuid}", token=token_of(box))["body"]
        if task["state"] in ("FAILED", "SUCCEEDED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, task
        time.sleep(0.2)
    assert task["state"] == "FAILED", task
    return task_uuid


def test_restart_keeps_the_journals_tasks(container: Container) -> None:
    task_uuid = create_failing_task(container)
    before = api(container, "GET", f"/v1/tasks/{task_uuid}", token=token_of(container))["body"]
    pid = show(container, "MainPID")["MainPID"]
    container.exec("systemctl", "restart", SERVICE)  # Type=notify: returns once the new agent listens
    assert container.exec("systemctl", "is-active", SERVICE).strip() == "active"
    assert show(container, "MainPID")["MainPID"] != pid
    wait_healthy(container)
    after = api(container, "GET", f"/v1/tasks/{task_uuid}", token=token_of(container))["body"]
    assert after == before
    assert "kvm-storage-agent stopped" in logs(container)  # the old one stopped gracefully, not killed


def test_stop_and_start_during_a_migration_leave_it_running_in_libvirt(container: Container) -> None:
    """KillMode=mixed and the agent's detach: the block copy belongs to libvirt and QEMU; the restarted
    agent picks it up from the journal and finishes it."""
    define_vm(container, "ksa-vm2", VM2_UUID, VM2_DISK, data_mib=160)
    container.exec("virsh", "-q", "start", "ksa-vm2")
    qemu_pid = container.exec("cat", "/run/libvirt/qemu/ksa-vm2.pid").strip()
    token = token_of(container)
    body = {
        "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": SECOND_UUID},
        "migrateVm": {"bandwidth": 16},  # MiB/s: 160 MiB of data take about 10 s
    }
    reply = api(container, "POST", f"/v1/vms/{VM2_UUID}/storage-migrations", body, token)
    assert reply["status"] == 202, reply
    task_uuid = reply["body"]["taskUuid"]
    deadline = time.monotonic() + 60
    while True:
        task = api(container, "GET", f"/v1/tasks/{task_uuid}", token=token)["body"]
        if task["state"] == "COPYING" and task["progress"]["bytesDone"] > 0:
            break
        assert task["state"] in ("PENDING", "PREPARING", "COPYING") and time.monotonic() < deadline, task
        time.sleep(0.2)

    # A restart, in its two halves: while no agent runs at all, the mirror and the VM go on.
    container.exec("systemctl", "stop", SERVICE)
    assert container.exec("systemctl", "is-active", SERVICE, check=False).strip() == "inactive"
    assert container.exec("cat", "/run/libvirt/qemu/ksa-vm2.pid").strip() == qemu_pid
    job = container.exec("virsh", "blockjob", "ksa-vm2", "vda", "--info")
    assert "Block Copy" in job, job
    container.exec("systemctl", "start", SERVICE)

    while True:
        task = api(container, "GET", f"/v1/tasks/{task_uuid}", token=token)["body"]
        if task["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, task
        time.sleep(0.5)
    assert task["state"] == "SUCCEEDED", task
    disks = container.exec("virsh", "domblklist", "ksa-vm2")
    assert SECOND_PATH in disks and STORAGE_PATH not in disks, disks
    assert "resuming" in logs(container)
    container.exec("virsh", "destroy", "ksa-vm2")


def test_install_again_upgrades_in_place_keeping_token_config_and_journal(container: Container) -> None:
    task_uuid = create_failing_task(container)
    token = token_of(container)
    config = container.path(CONFIG_FILE).read_text()
    live = container.exec("readlink", "/opt/kvm-storage-agent/current").strip()
    pid = show(container, "MainPID")["MainPID"]

    # From the checkout this time (built offline), with libvirtd's TCP listener on loopback; --port is a
    # config option and the config exists: it must be ignored, not applied.
    out = container.exec(
        INSTALL,
        "--wheelhouse",
        WHEELS_IN_CONTAINER,
        "--libvirt-tcp",
        "--migration-address",
        "127.0.0.1",
        "--port",
        "9999",
        timeout=300,
    )
    assert "kept the existing /etc/kvm-storage-agent/agent.toml" in out, out

    assert token_of(container) == token
    assert container.path(CONFIG_FILE).read_text() == config
    new_live = container.exec("readlink", "/opt/kvm-storage-agent/current").strip()
    assert new_live != live and re.fullmatch(r"venvs/[0-9]+-[0-9]+", new_live)
    assert container.exec("systemctl", "is-active", SERVICE).strip() == "active"
    assert show(container, "MainPID")["MainPID"] != pid
    # The command on PATH is the new code's.
    health = json.loads(
        container.exec("kvm-storage-agent", "health", "--agent", "http://127.0.0.1:7070", "--json")
    )
    assert health["hostUuid"] == HOST_UUID, health
    units = container.exec("systemctl", "list-units", "--all", "--plain", "--no-legend", "kvm-storage-agent*")
    assert len(units.splitlines()) == 1, units
    wait_healthy(container)
    task = api(container, "GET", f"/v1/tasks/{task_uuid}", token=token)
    assert task["status"] == 200 and task["body"]["state"] == "FAILED"

    # --libvirt-tcp: peers reach this libvirtd over TCP on the migration address.
    assert container.exec("systemctl", "is-active", "libvirtd-tcp.socket").strip() == "active"
    remote = container.exec("virsh", "-c", "qemu+tcp://127.0.0.1/system", "list", "--all", "--uuid")
    assert VM_UUID in remote.split()
    # The same again changes nothing: no new virtualenv, no restart of the agent or of libvirtd.
    pid = show(container, "MainPID")["MainPID"]
    out = container.exec(INSTALL, "--wheelhouse", WHEELS_IN_CONTAINER, "--libvirt-tcp", timeout=300)
    assert "already runs this code and unit: not restarted" in out, out
    assert "restarting libvirtd" not in out and "building" not in out, out
    assert show(container, "MainPID")["MainPID"] == pid
    assert container.exec("readlink", "/opt/kvm-storage-agent/current").strip() == new_live


def test_pki_dir_puts_libvirtd_and_qemu_on_tls(container: Container, tmp_path: Path) -> None:
    """--pki-dir: the host's files from `pki issue` in /etc/pki, libvirtd on its TLS socket with client
    certificates verified (the cluster's DNs only), qemu.conf's migration TLS forced."""
    ca = pki.init_ca(tmp_path / "cluster", cluster="ksa system test")
    pki.issue_host(ca.dir, "ksa-box", ["127.0.0.1"], out=container.path("/root/pki-host"))
    pki.issue_client(ca.dir, "operator", out=container.path("/root/operator"))
    other = pki.init_ca(tmp_path / "other", cluster="ksa system test")
    pki.issue_client(other.dir, "operator", out=container.path("/root/stranger"))
    pid = show(container, "MainPID")["MainPID"]

    out = container.exec(
        INSTALL, "--wheelhouse", WHEELS_IN_CONTAINER, "--pki-dir", "/root/pki-host", timeout=300
    )
    assert "restarting libvirtd with its TLS socket" in out, out
    assert "the kept /etc/kvm-storage-agent/agent.toml has no tls_cert" in out, out  # config never rewritten
    assert container.exec("systemctl", "is-active", "libvirtd-tls.socket").strip() == "active"
    for rel, mode, group in (
        ("CA/cacert.pem", 0o644, "root"),
        ("libvirt/servercert.pem", 0o644, "root"),
        ("libvirt/private/serverkey.pem", 0o600, "root"),
        ("libvirt/private/clientkey.pem", 0o600, "root"),
        ("qemu/server-key.pem", 0o640, "libvirt-qemu"),
        ("qemu/client-cert.pem", 0o644, "root"),
    ):
        found = container.exec("stat", "-c", "%a %G", f"/etc/pki/{rel}").split()
        assert found == [f"{mode:o}", group], (rel, found)
    libvirtd_conf = container.path("/etc/libvirt/libvirtd.conf").read_text()
    assert 'tls_allowed_dn_list = ["O=ksa system test,CN=*"]' in libvirtd_conf, libvirtd_conf
    assert "tls_no_verify_certificate = 0" in libvirtd_conf
    qemu_conf = container.path("/etc/libvirt/qemu.conf").read_text()
    assert "migrate_tls_force = 1" in qemu_conf and "migrate_tls_x509_verify = 1" in qemu_conf, qemu_conf

    uri = "qemu+tls://127.0.0.1/system?pkipath={}"
    listed = container.exec("virsh", "-c", uri.format("/root/operator"), "list", "--all", "--uuid")
    assert VM_UUID in listed.split()
    refused = container.exec("virsh", "-c", uri.format("/root/stranger"), "hostname", check=False)
    assert "failed to connect" in refused, refused
    # The agent was stopped and started again around libvirtd's restart, on the same code.
    wait_healthy(container)
    assert show(container, "MainPID")["MainPID"] != pid
    assert "narrow it with --tls-allowed-peer" in out, out

    # Narrowed to named peers (issue 22): a cluster certificate of another name is refused.
    pki.issue_client(ca.dir, "mallory", out=container.path("/root/mallory"))
    out = container.exec(
        INSTALL,
        "--wheelhouse",
        WHEELS_IN_CONTAINER,
        "--pki-dir",
        "/root/pki-host",
        "--tls-allowed-peer",
        "operator",
        "--tls-allowed-peer",
        "ksa-box",
        timeout=300,
    )
    libvirtd_conf = container.path("/etc/libvirt/libvirtd.conf").read_text()
    narrowed = 'tls_allowed_dn_list = ["O=ksa system test,CN=operator", "O=ksa system test,CN=ksa-box"]'
    assert narrowed in libvirtd_conf, libvirtd_conf
    assert VM_UUID in container.exec("virsh", "-c", uri.format("/root/operator"), "list", "--all", "--uuid")
    refused = container.exec("virsh", "-c", uri.format("/root/mallory"), "hostname", check=False)
    assert "failed to connect" in refused, refused
    wait_healthy(container)


def test_the_vagrant_demo_vm_moves_with_the_cli_on_path(container: Container) -> None:
    """vagrant/demo-vm and the README's command line, same-host here (the Vagrant lab goes cross-host)."""
    container.path("/usr/src/demo-vm").write_text((REPO / "vagrant" / "demo-vm").read_text())
    container.exec("chmod", "+x", "/usr/src/demo-vm")
    out = container.exec("env", f"KSA_STORAGE_PATH={STORAGE_PATH}", "/usr/src/demo-vm", "demo1")
    vm_uuid = out.strip().splitlines()[-1]
    assert container.exec("virsh", "-q", "domstate", "demo1").strip() == "running"
    out = container.exec(
        "kvm-storage-agent",
        "migrate",
        vm_uuid,
        "--agent",
        "http://127.0.0.1:7070",
        "--token-file",
        TOKEN_FILE,
        "--dst-storage",
        SECOND_UUID,
        "--with-snapshots",
        "--wait",
        timeout=120,
    )
    disks = container.exec("virsh", "domblklist", "demo1")
    container.exec("virsh", "destroy", "demo1")
    assert f"{SECOND_PATH}/demo1-root.qcow2" in disks, out + disks


def test_uninstall_leaves_no_unit_and_keeps_data_unless_purged(container: Container) -> None:
    container.exec(INSTALL, "--uninstall")
    assert not container.path("/etc/systemd/system/kvm-storage-agent.service").exists()
    files = container.exec("systemctl", "list-unit-files", "--no-legend", SERVICE, check=False)
    assert files.strip() == "", files
    state = container.exec("systemctl", "is-active", SERVICE, check=False).strip()
    assert state == "inactive", state
    assert not container.path("/opt/kvm-storage-agent").exists()
    assert container.path(TOKEN_FILE).exists() and container.path(JOURNAL_FILE).exists()
    assert container.path(STORAGE_PATH).is_dir()
    # The TCP listener set up by --libvirt-tcp is gone too.
    assert container.exec("systemctl", "is-enabled", "libvirtd-tcp.socket", check=False).strip() == "disabled"
    libvirtd_conf = container.path("/etc/libvirt/libvirtd.conf").read_text()
    assert libvirtd_conf == (container.lower / "etc/libvirt/libvirtd.conf").read_text()  # as Debian ships it
    # ... and the TLS settings and files of --pki-dir.
    assert container.exec("systemctl", "is-enabled", "libvirtd-tls.socket", check=False).strip() == "disabled"
    qemu_conf = container.path("/etc/libvirt/qemu.conf").read_text()
    assert qemu_conf == (container.lower / "etc/libvirt/qemu.conf").read_text() + QEMU_CONF
    assert not container.path("/etc/pki/libvirt/servercert.pem").exists()
    assert not container.path("/etc/pki/qemu/server-key.pem").exists()
    assert not container.path("/usr/local/bin/kvm-storage-agent").exists()

    container.exec(INSTALL, "--uninstall", "--purge")
    assert not container.path("/etc/kvm-storage-agent").exists()
    assert not container.path("/var/lib/kvm-storage-agent").exists()
    assert container.path(STORAGE_PATH).is_dir()  # VM data is never removed
