"""The lab's view of a guest's disks (labkit.domain.disks_in_xml): files, block devices and RBD images as
libvirt describes them, and what ``guest verify`` hands qemu-img for each (the RBD image as the lab's Ceph
admin reads it from the root namespace)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from labkit import ceph, domain, guests
from labkit.layout import CEPH_POOL

SECRET = "3f1f0a2e-8d7c-4a51-9a39-0f7d6c1b2e44"


def _domain(*disks: str) -> str:
    return f"<domain type='qemu'><name>g</name><devices>{''.join(disks)}</devices></domain>"


def _rbd_disk(name: str, dev: str = "vdb", fmt: str = "raw") -> str:
    return f"""<disk type='network' device='disk'>
  <driver name='qemu' type='{fmt}' cache='none'/>
  <source protocol='rbd' name='{name}' index='3'>
    <host name='10.213.0.1' port='6789'/>
  </source>
  <auth username='ksalab'><secret type='ceph' uuid='{SECRET}'/></auth>
  <backingStore/>
  <target dev='{dev}' bus='virtio'/>
</disk>"""


def _block_disk(dev_path: str, dev: str = "vdc") -> str:
    return f"""<disk type='block' device='disk'>
  <driver name='qemu' type='raw' cache='none'/>
  <source dev='{dev_path}' index='2'/>
  <backingStore/>
  <target dev='{dev}' bus='virtio'/>
</disk>"""


def test_a_file_disk_keeps_its_path_and_backing_chain() -> None:
    xml = _domain(
        """<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source file='/lab/ps1/top.qcow2' index='2'/>
  <backingStore type='file' index='1'>
    <format type='qcow2'/><source file='/lab/ps1/base.qcow2'/><backingStore/>
  </backingStore>
  <target dev='vda' bus='virtio'/>
</disk>"""
    )
    (disk,) = domain.disks_in_xml(xml)
    assert disk == domain.DiskInXml(
        dev="vda", path="/lab/ps1/top.qcow2", fmt="qcow2", chain=("/lab/ps1/top.qcow2", "/lab/ps1/base.qcow2")
    )
    assert (disk.kind, disk.location, disk.pool, disk.image) == ("file", "/lab/ps1/top.qcow2", "", "")


def test_the_lab_domain_xml_reads_back_as_file_disks() -> None:
    xml = domain.domain_xml(
        name="g",
        uuid="00000000-0000-0000-0000-000000000001",
        memory_mib=128,
        kernel=None,
        initrd="",
        cmdline="",
        console="/tmp/console",
        disks=[domain.DiskDef("vda", "/lab/a.qcow2", "s0"), domain.DiskDef("vdb", "/lab/b.raw", "s1", "raw")],
    )
    assert [(d.dev, d.kind, d.path, d.fmt) for d in domain.disks_in_xml(xml)] == [
        ("vda", "file", "/lab/a.qcow2", "qcow2"),
        ("vdb", "file", "/lab/b.raw", "raw"),
    ]


def test_a_block_disk_is_read_at_its_device_path() -> None:
    link = "/var/lib/ksa-lab/hostA/storage/blk/disk1"
    (disk,) = domain.disks_in_xml(_domain(_block_disk(link)))
    assert (disk.dev, disk.kind, disk.path, disk.fmt, disk.chain) == ("vdc", "block", link, "raw", (link,))
    assert disk.location == link and (disk.pool, disk.image) == ("", "")


def test_a_qcow2_on_a_block_device_over_a_file_lists_both_layers() -> None:
    xml = _domain(
        """<disk type='block' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source dev='/dev/loop7'/>
  <backingStore type='file'><format type='qcow2'/><source file='/lab/ps1/base.qcow2'/></backingStore>
  <target dev='vda' bus='virtio'/>
</disk>"""
    )
    (disk,) = domain.disks_in_xml(xml)
    assert (disk.kind, disk.path, disk.fmt, disk.chain) == (
        "block",
        "/dev/loop7",
        "qcow2",
        ("/dev/loop7", "/lab/ps1/base.qcow2"),
    )


def test_an_rbd_disk_names_pool_and_image_and_is_read_as_the_ceph_admin() -> None:
    (disk,) = domain.disks_in_xml(_domain(_rbd_disk("ksa/vol-1234")))
    assert (disk.dev, disk.kind, disk.fmt, disk.pool, disk.image) == ("vdb", "rbd", "raw", "ksa", "vol-1234")
    assert disk.location == "rbd:ksa/vol-1234" and disk.chain == ("rbd:ksa/vol-1234",)
    assert disk.path == ceph.qemu_uri("vol-1234")
    assert disk.path == f"rbd:ksa/vol-1234:id=admin:conf={ceph.CONF}:keyring={ceph.ADMIN_KEYRING}"


def test_an_rbd_image_in_a_namespace_keeps_the_namespace_in_its_name() -> None:
    (disk,) = domain.disks_in_xml(_domain(_rbd_disk("ksa/tenant1/vol-9", fmt="qcow2")))
    assert (disk.pool, disk.image, disk.fmt) == ("ksa", "tenant1/vol-9", "qcow2")
    assert disk.location == "rbd:ksa/tenant1/vol-9"
    assert disk.path.startswith("rbd:ksa/tenant1/vol-9:id=admin:")


def test_disks_of_every_kind_side_by_side_and_what_the_lab_cannot_read_is_left_out() -> None:
    xml = _domain(
        "<disk type='file' device='disk'><driver type='qcow2'/><source file='/lab/a.qcow2'/>"
        "<target dev='vda'/></disk>",
        _rbd_disk("ksa/r", dev="vdb"),
        _block_disk("/dev/loop3", dev="vdc"),
        # an NBD export, an RBD name without an image, an empty cdrom, a libvirt pool's volume: not the lab's
        "<disk type='network' device='disk'><driver type='raw'/><source protocol='nbd' name='x'>"
        "<host name='10.0.0.1' port='10809'/></source><target dev='vdd'/></disk>",
        "<disk type='network' device='disk'><source protocol='rbd' name='ksa'/><target dev='vde'/></disk>",
        "<disk type='file' device='cdrom'><target dev='hdc'/></disk>",
        "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdf'/></disk>",
    )
    assert [(d.dev, d.kind, d.location) for d in domain.disks_in_xml(xml)] == [
        ("vda", "file", "/lab/a.qcow2"),
        ("vdb", "rbd", "rbd:ksa/r"),
        ("vdc", "block", "/dev/loop3"),
    ]


def test_rbd_used_bytes_adds_the_images_head_not_its_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    doc = {
        "images": [
            {
                "name": "v",
                "snapshot": "s1",
                "snapshot_id": 4,
                "provisioned_size": 64 << 20,
                "used_size": 4 << 20,
            },
            {"name": "v", "id": "1f", "provisioned_size": 64 << 20, "used_size": 8 << 20},
        ],
        "total_provisioned_size": 64 << 20,
        "total_used_size": 12 << 20,
    }

    def fake_rbd(*args: str, timeout: float = 120) -> str:
        calls.append(args)
        return json.dumps(doc) if args[0] == "du" else json.dumps(["b", "a"])

    monkeypatch.setattr(ceph, "rbd", fake_rbd)
    assert ceph.rbd_used_bytes("v") == 8 << 20
    assert ceph.rbd_images() == ["a", "b"]
    assert calls == [("du", "--format", "json", f"{CEPH_POOL}/v"), ("ls", "--format", "json", CEPH_POOL)]


@pytest.mark.usefixtures("qemu_tools")
def test_read_raw_reads_the_whole_chain_of_a_file_disk(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", base, "1M"], check=True, capture_output=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 4k", base], check=True, capture_output=True)
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", base, top], check=True, capture_output=True
    )
    subprocess.run(["qemu-io", "-c", "write -P 0xa5 64k 4k", top], check=True, capture_output=True)
    xml = _domain(
        f"<disk type='file' device='disk'><driver type='qcow2'/><source file='{top}'/>"
        "<target dev='vda'/></disk>"
    )
    (disk,) = domain.disks_in_xml(xml)
    guests.read_raw(disk, tmp_path / "out.raw")
    data = (tmp_path / "out.raw").read_bytes()
    assert len(data) == 1 << 20
    assert data[:4096] == b"\x5a" * 4096 and data[64 << 10 : 68 << 10] == b"\xa5" * 4096
