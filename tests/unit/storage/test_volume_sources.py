"""Volumes named by kind and location (issue 25): the destination ``<disk>`` libvirt is given for a file, a
block device and an RBD image, the persistent definition rewritten by kind, plans journalled with their kinds
(and journals from before kinds read as files), and a block device given back blank."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from agent.config import StorageKind
from agent.migration.plan import DiskPlan, MigrationPlan
from agent.migration.volumes import kind_of_disk, release_created
from agent.storage import blockdir
from agent.storage.roots import StorageRoot, StorageRoots
from agent.virt.domxml import RbdAccess, VolumeSource, block_copy_dest_xml, parse_disks, rewrite_disk_sources

ACCESS = RbdAccess((("10.0.0.1", 6789), ("fd00::3", 3300)), "ksalab", "42f70c62-a3e1-415f-bfc0-4ad1f8875fa0")

DOMAIN = """<domain><name>vm</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
    <source file='/ps1/root.qcow2' index='2'/><backingStore type='file' index='3'><format type='qcow2'/>
    <source file='/ps1/base.qcow2'/></backingStore><target dev='vda' bus='virtio'/></disk>
  <disk type='network' device='disk'><driver name='qemu' type='raw'/>
    <source protocol='rbd' name='ksa/data'><host name='10.0.0.1' port='6789'/></source>
    <auth username='ksalab'><secret type='ceph' uuid='42f70c62-a3e1-415f-bfc0-4ad1f8875fa0'/></auth>
    <target dev='vdb' bus='virtio'/></disk>
</devices></domain>"""


def test_the_block_copy_destination_is_a_disk_of_the_volumes_kind() -> None:
    block = ET.fromstring(block_copy_dest_xml(VolumeSource(StorageKind.BLOCK, "/dev/vg/a'b", "qcow2")))
    assert block.get("type") == "block" and block.find("source").attrib == {"dev": "/dev/vg/a'b"}  # type: ignore[union-attr]
    assert block.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert block.find("auth") is None
    rbd = ET.fromstring(block_copy_dest_xml(VolumeSource(StorageKind.RBD, "rbd:ksa/ns/img", "raw", ACCESS)))
    source = rbd.find("source")
    assert rbd.get("type") == "network" and source is not None
    assert (source.get("protocol"), source.get("name")) == ("rbd", "ksa/ns/img")
    assert [(h.get("name"), h.get("port")) for h in source.findall("host")] == [
        ("10.0.0.1", "6789"),
        ("fd00::3", "3300"),
    ]
    auth = rbd.find("auth")
    assert auth is not None and auth.get("username") == "ksalab"
    assert auth.find("secret").attrib == {"type": "ceph", "uuid": ACCESS.secret_uuid}  # type: ignore[union-attr]
    # A file destination is written as before.
    as_file = block_copy_dest_xml(VolumeSource.file("/ps2/x.qcow2", "qcow2"))
    assert parse_disks(f"<domain><devices>{as_file}</devices></domain>") == parse_disks(
        f"<domain><devices>{block_copy_dest_xml('/ps2/x.qcow2', 'qcow2')}</devices></domain>"
    )
    with pytest.raises(ValueError, match="monitors"):
        block_copy_dest_xml(VolumeSource(StorageKind.RBD, "rbd:ksa/img", "raw"))


def test_the_definition_is_rewritten_by_kind_and_an_rbd_disk_keeps_no_stale_auth() -> None:
    out = rewrite_disk_sources(
        DOMAIN,
        {
            "vda": VolumeSource(StorageKind.BLOCK, "/blk/disk0", "qcow2"),
            "vdb": VolumeSource.file("/ps2/data.raw", "raw"),
        },
    )
    vda, vdb = parse_disks(out)
    assert (vda.type, vda.location, vda.format, vda.backing) == ("block", "/blk/disk0", "qcow2", ())
    assert (vdb.type, vdb.location, vdb.format) == ("file", "/ps2/data.raw", "raw")
    root = ET.fromstring(out)
    assert [d.find("auth") for d in root.findall("./devices/disk")] == [None, None]
    assert root.find("./devices/disk/driver").get("cache") == "none"  # type: ignore[union-attr]
    back = rewrite_disk_sources(out, {"vdb": VolumeSource(StorageKind.RBD, "rbd:ksa/data2", "raw", ACCESS)})
    disk = ET.fromstring(back).findall("./devices/disk")[1]
    assert [child.tag for child in disk][:3] == ["driver", "source", "auth"]
    assert parse_disks(back)[1].location == "rbd:ksa/data2"
    assert [kind_of_disk(d) for d in parse_disks(back)] == [StorageKind.BLOCK, StorageKind.RBD]


def _disk(**kinds: StorageKind) -> DiskPlan:
    return DiskPlan(
        target="vda", volume_uuid="root", role="Root", src_top="/ps1/root.qcow2", src_format="qcow2",
        dst_top="/blk/disk1", dst_format="raw", virtual_size=1 << 30, flatten=True, lower_layers=(),
        dst_backing=None, dst_backing_format=None, src_chain=("/ps1/root.qcow2",), estimated_bytes=1 << 20,
        **kinds,
    )  # fmt: skip


def test_a_plan_is_journalled_with_its_kinds_and_an_old_journal_names_files() -> None:
    plan = MigrationPlan("vm", "blk", (_disk(dst_kind=StorageKind.BLOCK),), ())
    again = MigrationPlan.from_dict(plan.to_dict())
    assert again == plan and again.disks[0].dst_kind is StorageKind.BLOCK
    disk = again.disks[0]  # a raw volume on a device: the disk's size of it
    assert disk.dst_source() == VolumeSource(StorageKind.BLOCK, "/blk/disk1", "raw", size=disk.virtual_size)
    assert plan.summary()["disks"][0] | {"fromKind": "file", "toKind": "block"} == plan.summary()["disks"][0]
    old = plan.to_dict()
    for entry in old["disks"]:
        del entry["src_kind"], entry["dst_kind"]
    assert MigrationPlan.from_dict(old).disks[0].dst_kind is StorageKind.FILE


def test_a_device_is_blank_until_written_and_released_blank(tmp_path: Path) -> None:
    device = tmp_path / "dev"
    device.write_bytes(bytes(3 << 20))
    assert blockdir.is_blank(device)
    with device.open("r+b") as handle:
        handle.seek(blockdir.BLANK_HEAD - 1)
        handle.write(b"Q")
        handle.seek(2 << 20)
        handle.write(b"data")
    assert not blockdir.is_blank(device)
    blockdir.release(device)  # a regular file: no BLKZEROOUT/BLKDISCARD, the head is written with zeros
    assert blockdir.is_blank(device) and device.stat().st_size == 3 << 20


async def test_undoing_a_created_volume_goes_by_the_kind_of_its_storage(tmp_path: Path) -> None:
    root = tmp_path / "ps"
    root.mkdir()
    made, outside = root / "made.qcow2", tmp_path / "outside.qcow2"
    made.write_bytes(b"x")
    outside.write_bytes(b"x")
    roots = StorageRoots([StorageRoot("ps", root)])
    log = logging.LoggerAdapter(logging.getLogger("test"), {})
    host: Any = None  # a file is removed without libvirt
    await release_created(host, roots, str(made), log)
    await release_created(host, roots, str(outside), log)
    assert not made.exists() and outside.exists()
