"""Domain XML corners the engines meet: block and network disks, inactive definitions without a chain,
a mirror not yet ready, disks without a driver or serial, and rewriting a disk whose source carries more
than a file (an index, a seclabel) or that was a block device."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from agent.virt.domxml import DiskXml, block_copy_dest_xml, domain_name, parse_disks, rewrite_disk_sources

INACTIVE = """<domain type='kvm'>
  <name>web-1</name>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg0/lv-data'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <target dev='vdb' bus='virtio'/>
      <serial>
        data-serial
      </serial>
      <shareable/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/ps1/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <boot order='2'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/image'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/ps1/copying.qcow2' index='1'/>
      <backingStore/>
      <target dev='vdd' bus='virtio'/>
      <alias name='virtio-disk3'/>
      <mirror type='file' job='copy'><format type='qcow2'/><source file='/ps2/copying.qcow2'/></mirror>
    </disk>
  </devices>
</domain>"""


def by_target(xml: str) -> dict[str, DiskXml]:
    return {d.target: d for d in parse_disks(xml)}


def disk_element(xml: str, target: str) -> ET.Element:
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        dev = disk.find("target")
        if dev is not None and dev.get("dev") == target:
            return disk
    raise AssertionError(f"no disk {target}")


def test_a_block_disk_reports_its_device_path() -> None:
    vdb = parse_disks(INACTIVE)[0]
    assert (vdb.type, vdb.source, vdb.format) == ("block", "/dev/vg0/lv-data", "raw")
    assert vdb.serial == "data-serial", "whitespace around the serial is not part of it"
    assert vdb.shareable and not vdb.readonly
    assert vdb.boot_order is None and vdb.alias is None and vdb.backing == ()


def test_a_disk_without_driver_serial_or_chain_reads_as_unknowns() -> None:
    vda = parse_disks(INACTIVE)[1]
    assert vda.source == "/ps1/root.qcow2"
    assert vda.format is None and vda.serial is None
    assert vda.boot_order == 2
    assert vda.backing == () and not vda.mirror


def test_a_network_disk_has_no_path() -> None:
    vdc = parse_disks(INACTIVE)[2]
    assert vdc.type == "network" and vdc.source is None and vdc.format == "raw"


def test_a_mirror_is_ready_only_when_libvirt_says_so() -> None:
    vdd = parse_disks(INACTIVE)[3]
    assert vdd.mirror and not vdd.mirror_ready
    assert vdd.alias == "virtio-disk3"
    assert vdd.backing == (), "an empty <backingStore/> ends the chain"


def test_domain_name() -> None:
    assert domain_name(INACTIVE) == "web-1"
    assert domain_name("<domain type='kvm'><devices/></domain>") == ""


def test_rewrite_turns_a_block_disk_into_a_plain_file() -> None:
    out = rewrite_disk_sources(INACTIVE, {"vdb": ("/ps2/data.qcow2", "qcow2")})
    vdb = parse_disks(out)[0]
    assert (vdb.type, vdb.source, vdb.format) == ("file", "/ps2/data.qcow2", "qcow2")
    source = disk_element(out, "vdb").find("source")
    assert source is not None and source.attrib == {"file": "/ps2/data.qcow2"}
    assert list(source) == [], "the old device's seclabel does not apply to the new file"
    # Everything else of the disk stays: the cache mode, the serial, the shareable flag.
    driver = disk_element(out, "vdb").find("driver")
    assert driver is not None and driver.get("cache") == "none"
    assert vdb.serial == "data-serial" and vdb.shareable


def test_rewrite_adds_a_driver_when_there_was_none_and_drops_index_and_mirror() -> None:
    out = rewrite_disk_sources(
        INACTIVE, {"vda": ("/ps2/root.qcow2", "qcow2"), "vdd": ("/ps2/copying.qcow2", "qcow2")}
    )
    disks = by_target(out)
    vda, vdd = disks["vda"], disks["vdd"]
    assert vda.source == "/ps2/root.qcow2" and vda.format == "qcow2"
    assert vdd.source == "/ps2/copying.qcow2" and not vdd.mirror
    driver = disk_element(out, "vda").find("driver")
    assert driver is not None and driver.get("name") == "qemu"
    assert "index=" not in out
    # Disks not named are left exactly as they were.
    assert disks["vdb"] == by_target(INACTIVE)["vdb"] and disks["vdc"] == by_target(INACTIVE)["vdc"]


def test_block_copy_destination_reads_back_as_a_file_disk() -> None:
    xml = block_copy_dest_xml("/ps2/a&b <c>.qcow2", "raw")
    disk = ET.fromstring(xml)
    source, driver = disk.find("source"), disk.find("driver")
    assert disk.get("type") == "file"
    assert source is not None and source.get("file") == "/ps2/a&b <c>.qcow2"
    assert driver is not None and driver.get("type") == "raw"
