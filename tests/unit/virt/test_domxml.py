"""Domain XML reading and rewriting."""

from __future__ import annotations

import pytest

from agent.virt.domxml import block_copy_dest_xml, parse_disks, rewrite_disk_sources

LIVE = """<domain type='qemu'><name>g1</name><devices>
<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2'/>
  <source file='/ps1/top.qcow2' index='3'/>
  <backingStore type='file' index='2'><format type='qcow2'/><source file='/ps1/mid.qcow2'/>
    <backingStore type='file' index='1'><format type='qcow2'/><source file='/ps1/base.qcow2'/>
      <backingStore/></backingStore></backingStore>
  <target dev='vda' bus='virtio'/><serial>abc</serial><boot order='1'/>
  <mirror type='file' job='copy' ready='yes'><format type='qcow2'/><source file='/ps2/top.qcow2'/></mirror>
</disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/>
  <readonly/></disk>
<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='h'/></source>
  <target dev='vdc' bus='virtio'/></disk>
</devices></domain>"""


def test_parse_disks_reads_chain_mirror_and_flags() -> None:
    vda, sda, vdc = parse_disks(LIVE)
    assert vda.target == "vda" and vda.source == "/ps1/top.qcow2" and vda.format == "qcow2"
    assert vda.backing == (("/ps1/mid.qcow2", "qcow2"), ("/ps1/base.qcow2", "qcow2"))
    assert vda.serial == "abc" and vda.boot_order == 1
    assert vda.mirror and vda.mirror_ready
    assert sda.device == "cdrom" and sda.readonly and sda.source is None
    assert vdc.type == "network" and vdc.source is None


def test_rewrite_points_disk_at_new_file_and_drops_stale_chain() -> None:
    out = rewrite_disk_sources(LIVE, {"vda": ("/ps2/new top.qcow2", "qcow2")})
    (vda, _sda, _vdc) = parse_disks(out)
    assert vda.source == "/ps2/new top.qcow2"
    assert vda.backing == () and not vda.mirror
    assert '/ps2/new top.qcow2" index=' not in out and "'/ps2/new top.qcow2' index=" not in out


def test_rewrite_refuses_unknown_disk() -> None:
    with pytest.raises(ValueError, match="vdz"):
        rewrite_disk_sources(LIVE, {"vdz": ("/x", "raw")})


def test_dest_xml_quotes_paths() -> None:
    xml = block_copy_dest_xml("/a/b'c.qcow2", "qcow2")
    assert "b'c.qcow2" in xml and xml.startswith("<disk type='file'>")
