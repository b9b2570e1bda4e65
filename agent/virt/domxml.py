"""Reading and rewriting libvirt domain XML: the disks, and where the ones that move go.

A volume is named by kind and location (``VolumeSource``): a file (``<disk type='file'>``), a block device
(``<disk type='block'>``) or an RBD image (``<disk type='network'>`` with its monitors and ``<auth>``).
Pure functions over strings (ElementTree), so they are unit tested without libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from agent.config import StorageKind


@dataclass(frozen=True)
class DiskXml:
    """One ``<disk>`` of a domain, as far as storage migration cares."""

    target: str  # vda, sdb ...
    device: str  # disk, cdrom, floppy, lun
    type: str  # file, block, network, volume
    source: str | None  # file or block path; None for network or empty cdrom
    format: str | None  # driver type: qcow2, raw
    readonly: bool
    shareable: bool
    serial: str | None
    boot_order: int | None
    backing: tuple[tuple[str, str | None], ...]  # (path, format) below the source, live XML only
    mirror: bool  # a block copy job is attached to this disk
    mirror_ready: bool
    alias: str | None = None  # libvirt's device alias (live XML), e.g. virtio-disk0
    #: Where the volume is, by kind (agent/storage/locations.py): the file or device path, ``rbd:pool/image``
    #: for an RBD network disk; None for other network disks and an empty drive.
    location: str | None = None
    #: The bytes of the source the guest sees (``<slices><slice type='storage' size=...>``): a raw volume
    #: on a larger block device; None when the guest sees the whole source.
    slice_size: int | None = None


def _source_path(elem: ET.Element, disk_type: str) -> str | None:
    src = elem.find("source")
    if src is None:
        return None
    if disk_type == "file":
        return src.get("file")
    if disk_type == "block":
        return src.get("dev")
    return None


def _location(elem: ET.Element, disk_type: str) -> str | None:
    src = elem.find("source")
    if disk_type == "network" and src is not None and src.get("protocol") == "rbd" and src.get("name"):
        return f"rbd:{src.get('name')}"
    return _source_path(elem, disk_type)


def _slice_size(elem: ET.Element) -> int | None:
    node = elem.find("source/slices/slice[@type='storage']")
    size = node.get("size") if node is not None else None
    return int(size) if size else None


def _backing_chain(disk: ET.Element) -> tuple[tuple[str, str | None], ...]:
    chain: list[tuple[str, str | None]] = []
    node = disk.find("backingStore")
    while node is not None and node.get("type") is not None:
        fmt = node.find("format")
        path = _source_path(node, node.get("type", "file"))
        if path is None:
            break
        chain.append((path, fmt.get("type") if fmt is not None else None))
        node = node.find("backingStore")
    return tuple(chain)


def parse_disks(xml: str) -> list[DiskXml]:
    root = ET.fromstring(xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        driver = disk.find("driver")
        serial = disk.find("serial")
        boot = disk.find("boot")
        mirror = disk.find("mirror")
        alias = disk.find("alias")
        disk_type = disk.get("type", "file")
        disks.append(
            DiskXml(
                target=target.get("dev", "") if target is not None else "",
                device=disk.get("device", "disk"),
                type=disk_type,
                source=_source_path(disk, disk_type),
                format=driver.get("type") if driver is not None else None,
                readonly=disk.find("readonly") is not None,
                shareable=disk.find("shareable") is not None,
                serial=serial.text.strip() if serial is not None and serial.text else None,
                boot_order=int(boot.get("order", "0")) if boot is not None else None,
                backing=_backing_chain(disk),
                mirror=mirror is not None,
                mirror_ready=mirror is not None and mirror.get("ready") == "yes",
                alias=alias.get("name") if alias is not None else None,
                location=_location(disk, disk_type),
                slice_size=_slice_size(disk),
            )
        )
    return disks


def mirror_targets(xml: str) -> list[str]:
    """Where the domain's running block copies write (``<mirror>``'s source: a file, a device, an RBD image
    as ``rbd:pool/image``)."""
    found = []
    for mirror in ET.fromstring(xml).findall("./devices/disk/mirror"):
        location = _location(mirror, mirror.get("type", "file"))
        if location:
            found.append(location)
    return found


def domain_name(xml: str) -> str:
    name = ET.fromstring(xml).findtext("name")
    return name or ""


@dataclass(frozen=True)
class RbdAccess:
    """How QEMU reaches an RBD pool: its monitors, and the cephx user whose key is the libvirt secret."""

    monitors: tuple[tuple[str, int], ...]
    user: str
    secret_uuid: str


@dataclass(frozen=True)
class VolumeSource:
    """Where a disk's volume is, as libvirt needs it: by kind and location (a file path, a device path, or
    ``rbd:pool[/namespace]/image`` with ``rbd`` saying how to reach the pool), and the format on it."""

    kind: StorageKind
    location: str
    format: str
    rbd: RbdAccess | None = None
    #: A raw volume on a block device larger than the disk: the bytes from the device's start the guest
    #: sees (libvirt's storage slice; QEMU's mirror wants a target of the source's size).
    size: int | None = None

    @classmethod
    def file(cls, path: str, fmt: str) -> VolumeSource:
        return cls(StorageKind.FILE, path, fmt)

    @property
    def disk_type(self) -> str:
        """libvirt's ``<disk type=...>``."""
        return {StorageKind.FILE: "file", StorageKind.BLOCK: "block", StorageKind.RBD: "network"}[self.kind]

    def fill_source(self, src: ET.Element) -> None:
        """Set ``<source>``'s attributes and children for this volume (``src`` is empty)."""
        if self.kind is StorageKind.FILE:
            src.set("file", self.location)
        elif self.kind is StorageKind.BLOCK:
            src.set("dev", self.location)
            if self.size is not None:
                slices = ET.SubElement(src, "slices")
                ET.SubElement(slices, "slice", {"type": "storage", "offset": "0", "size": str(self.size)})
        else:
            if self.rbd is None:
                raise ValueError(f"{self.location}: an RBD source needs its pool's monitors and secret")
            src.set("protocol", "rbd")
            src.set("name", self.location.removeprefix("rbd:"))
            for host, port in self.rbd.monitors:
                ET.SubElement(src, "host", {"name": host, "port": str(port)})

    def fill_auth(self, disk: ET.Element) -> None:
        """An RBD disk's ``<auth>`` naming the secret (libvirt 9 takes it under ``<disk>``); none for the
        other kinds."""
        for node in disk.findall("auth"):
            disk.remove(node)
        if self.kind is StorageKind.RBD and self.rbd is not None:
            auth = ET.Element("auth", {"username": self.rbd.user})
            ET.SubElement(auth, "secret", {"type": "ceph", "uuid": self.rbd.secret_uuid})
            # libvirt's schema wants <auth> before <target>: put it right after <source>.
            children = list(disk)
            src = disk.find("source")
            disk.insert(children.index(src) + 1 if src is not None else 0, auth)


def _as_source(value: VolumeSource | tuple[str, str]) -> VolumeSource:
    return value if isinstance(value, VolumeSource) else VolumeSource.file(*value)


def block_copy_dest_xml(path: str | VolumeSource, fmt: str | None = None) -> str:
    """The ``<disk>`` document virDomainBlockCopy takes as its destination: a file ``path`` of ``fmt``, or
    any ``VolumeSource`` (a block device, an RBD image with its ``<auth>``)."""
    if isinstance(path, str):
        if fmt is None:
            raise TypeError("a file destination needs its format")
        return f"<disk type='file'><source file={quoteattr(path)}/><driver type={quoteattr(fmt)}/></disk>"
    source = path
    disk = ET.Element("disk", {"type": source.disk_type})
    source.fill_source(ET.SubElement(disk, "source"))
    source.fill_auth(disk)
    ET.SubElement(disk, "driver", {"type": source.format})
    return ET.tostring(disk, encoding="unicode")


def rewrite_disk_sources(xml: str, new_sources: Mapping[str, VolumeSource | tuple[str, str]]) -> str:
    """Point the named disks (target -> ``VolumeSource``, or (path, format) for a file) at new volumes;
    drop their stale ``<backingStore>``; an RBD disk gets its ``<auth>``, other kinds lose theirs.

    Used for the persistent definition after a pivot (libvirt 9 updates only the live XML) and for the
    destination XML of a migration. libvirt probes the chain again from the image headers.
    """
    root = ET.fromstring(xml)
    seen = set()
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") not in new_sources:
            continue
        dev = target.get("dev", "")
        source = _as_source(new_sources[dev])
        disk.set("type", source.disk_type)
        src = disk.find("source")
        if src is None:
            src = ET.SubElement(disk, "source")
        src.attrib.clear()
        for child in list(src):
            src.remove(child)
        source.fill_source(src)
        source.fill_auth(disk)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", source.format)
        for node in disk.findall("backingStore"):
            disk.remove(node)
        for node in disk.findall("mirror"):
            disk.remove(node)
        seen.add(dev)
    missing = set(new_sources) - seen
    if missing:
        raise ValueError(f"disks not in the domain XML: {', '.join(sorted(missing))}")
    return ET.tostring(root, encoding="unicode")
