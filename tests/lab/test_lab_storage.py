"""The lab's storage beyond files: its one-node cephx Ceph, reached from both hosts' QEMUs through each host's
libvirt secret, and each host's block devices. A disk-less domain (SeaBIOS only: no guest kernel needed) on
each host gets an RBD disk and a block disk; QEMU's own ``qemu-io`` (HMP) writes through them, and the bytes
are read back from outside, with ``rbd export`` and from the loop device. The agents know both as primary
storages of their kinds (the moves onto them: test_kinds_samehost.py)."""

from __future__ import annotations

import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from labtools import Lab, LabHost

from agent.storage import blockdir
from labkit.agents import agent_client
from labkit.labview import CephCluster
from labkit.layout import BLOCK_DEVICE_MIB, BLOCK_DEVICES, BLOCK_ROOT

pytestmark = pytest.mark.lab

MIB = 1 << 20


def _run(argv: list[str], input: bytes | None = None) -> bytes:
    proc = subprocess.run(argv, input=input, capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.decode()}"
    return proc.stdout


@pytest.fixture
def rbd_image(lab: Lab) -> Iterator[str]:
    """A new 64 MiB image in the lab's pool (pool/name), removed at teardown."""
    image = f"{lab.ceph.pool}/t-lab-{uuid.uuid4().hex[:8]}"
    _run(lab.ceph.rbd_argv("create", image, "--size", "64M"))
    yield image
    _run(lab.ceph.rbd_argv("rm", "--no-progress", image))


def _rbd_disk(ceph: CephCluster, image: str, dev: str) -> str:
    return f"""<disk type='network' device='disk'>
  <driver name='qemu' type='raw' cache='none'/>
  <source protocol='rbd' name='{image}'><host name='{ceph.monitor_host}' port='{ceph.monitor_port}'/></source>
  <auth username='{ceph.user}'><secret type='ceph' uuid='{ceph.secret_uuid}'/></auth>
  <target dev='{dev}' bus='virtio'/>
</disk>"""


def _block_disk(path: Path, dev: str) -> str:
    return f"""<disk type='block' device='disk'>
  <driver name='qemu' type='raw' cache='none'/><source dev='{path}'/><target dev='{dev}' bus='virtio'/>
</disk>"""


def _qemu_io(host: LabHost, domain: str, qdev: str, command: str) -> str:
    """QEMU's qemu-io on one of the domain's disks, by its device id (libvirt: virtio-disk0, ...)."""
    hmp = f'qemu-io -d /machine/peripheral/{qdev}/virtio-backend "{command}"'
    return host.virsh("qemu-monitor-command", domain, "--hmp", hmp)


def test_every_host_holds_the_ceph_secret_under_one_uuid(lab: Lab) -> None:
    ceph = lab.ceph
    for host in lab.hosts:
        secret = ET.fromstring(host.virsh("secret-dumpxml", ceph.secret_uuid))
        assert secret.get("private") == "yes" and secret.get("ephemeral") == "no"
        assert secret.find("usage").get("type") == "ceph"  # type: ignore[union-attr]
        assert secret.findtext("usage/name") == f"client.{ceph.user} secret"
    # The cluster listens where the hosts' namespaces reach it: the bridge, not the loopback.
    assert ceph.monitor_host == lab.raw["hosts"][0]["address"].rsplit(".", 1)[0] + ".1"


def test_each_hosts_qemu_writes_through_rbd_with_the_secret_and_to_its_block_device(
    lab: Lab, rbd_image: str
) -> None:
    ceph = lab.ceph
    for index, host in enumerate(lab.hosts):
        device = host.block_root / "disk0"
        assert device.is_symlink() and Path(device.resolve()).is_block_device(), device
        domain = f"t-lab-storage-{uuid.uuid4().hex[:6]}"
        xml = f"""<domain type='qemu'><name>{domain}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>{_rbd_disk(ceph, rbd_image, "vda")}{_block_disk(device, "vdb")}</devices>
</domain>"""
        path = Path(f"/tmp/{domain}.xml")
        path.write_text(xml)
        try:
            host.virsh("create", str(path))
            rbd_pattern, block_pattern = 0x50 + index, 0x60 + index
            _qemu_io(host, domain, "virtio-disk0", f"write -P {rbd_pattern:#x} {index * MIB} 1M")
            _qemu_io(host, domain, "virtio-disk1", f"write -P {block_pattern:#x} 0 1M")
        finally:
            host.virsh("destroy", domain, check=False)
            path.unlink()
        exported = _run(ceph.rbd_argv("export", "--no-progress", rbd_image, "-"))
        assert exported[index * MIB : (index + 1) * MIB] == bytes([rbd_pattern]) * MIB, host.name
        with device.open("rb") as handle:
            written = handle.read(MIB)
        blockdir.release(device)  # blank again: the agent takes only blank devices
        assert written == bytes([block_pattern]) * MIB, host.name


async def test_the_agents_list_the_rbd_and_block_storages(lab_agents: Lab) -> None:
    ceph = lab_agents.ceph
    for host in lab_agents.hosts:
        block = host.root(BLOCK_ROOT)
        async with agent_client(lab_agents, host) as agent:
            storages = {entry["uuid"]: entry for entry in (await agent.host())["storage"]}
            assert storages[ceph.storage_uuid] | {"monitors": None} == {
                "uuid": ceph.storage_uuid, "kind": "rbd", "location": f"rbd:{ceph.pool}", "path": None,
                "totalBytes": None, "freeBytes": None, "pool": ceph.pool, "namespace": "",
                "monitors": None, "user": ceph.user, "secretUuid": ceph.secret_uuid,
            }  # fmt: skip
            assert storages[ceph.storage_uuid]["monitors"] == list(ceph.monitors)
            assert storages[block.uuid]["kind"] == "block" and storages[block.uuid]["path"] == str(block.path)
            assert storages[block.uuid]["devices"] == BLOCK_DEVICES
            assert storages[block.uuid]["totalBytes"] == BLOCK_DEVICES * BLOCK_DEVICE_MIB * MIB
