"""Test-guest domains in libvirt: the domain XML, and finding a domain (and its disks) on any lab host."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from . import ceph
from .layout import HOSTS, HostSpec
from .sysutil import LabError
from .virsh import virsh, virsh_run

EMULATOR = "/usr/bin/qemu-system-x86_64"
METADATA_NS = "urn:kvm-storage-agent:lab"


@dataclass(frozen=True)
class DiskDef:
    dev: str
    path: str  # a file, or for an RBD image ``pool/image``
    serial: str
    fmt: str = "qcow2"
    #: An RBD image: the monitor (host, port), the cephx user and the libvirt secret's uuid.
    rbd: tuple[str, int, str, str] | None = None

    def source_xml(self) -> str:
        if self.rbd is None:
            return f"<source file={quoteattr(self.path)}/>"
        host, port, user, secret = self.rbd
        return (
            f"<source protocol='rbd' name={quoteattr(self.path)}>"
            f"<host name={quoteattr(host)} port='{port}'/></source>\n"
            f"      <auth username={quoteattr(user)}><secret type='ceph' uuid={quoteattr(secret)}/></auth>"
        )


def domain_xml(
    *,
    name: str,
    uuid: str,
    memory_mib: int,
    kernel: str | None,
    initrd: str,
    cmdline: str,
    console: str,
    disks: list[DiskDef],
) -> str:
    """A persistent TCG domain with direct kernel boot. TCG (type='qemu'): a Linux guest hangs under
    nested KVM on the lab machines (LAB-NOTES). The serial console appends to a file outside the per-host
    mounts, so after a migration the destination's QEMU adds to what the source wrote. ``kernel`` None: a
    bare guest, no kernel at all (the firmware finds nothing to boot and waits; see ``GuestOptions.bare``)."""
    direct_boot = (
        f"""
    <kernel>{escape(kernel)}</kernel>
    <initrd>{escape(initrd)}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>"""
        if kernel is not None
        else ""
    )
    disk_xml = []
    for index, disk in enumerate(disks):
        boot = "\n      <boot order='1'/>" if index == 0 else ""
        disk_xml.append(
            f"""    <disk type={quoteattr("file" if disk.rbd is None else "network")} device='disk'>
      <driver name='qemu' type={quoteattr(disk.fmt)}/>
      {disk.source_xml()}
      <target dev={quoteattr(disk.dev)} bus='virtio'/>
      <serial>{escape(disk.serial)}</serial>{boot}
    </disk>"""
        )
    disks_text = "\n".join(disk_xml)
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{escape(uuid)}</uuid>
  <title>kvm-storage-agent lab guest</title>
  <metadata>
    <ksa:guest xmlns:ksa={quoteattr(METADATA_NS)}>{escape(name)}</ksa:guest>
  </metadata>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>{direct_boot}
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
{disks_text}
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path={quoteattr(console)} append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass(frozen=True)
class DiskInXml:
    """A disk as libvirt currently describes it: the active image and the layers below it, top first.

    ``kind`` is where the active image lives: ``file`` (``<disk type='file'>``, ``path`` is the file),
    ``block`` (``<disk type='block'>``, ``path`` is ``<source dev=...>`` as the XML names it) or ``rbd``
    (``<disk type='network'>`` with ``<source protocol='rbd' name='pool/image'>``: ``pool`` and ``image``,
    the name in the pool with its namespace if any; ``path`` is what ``qemu-img`` reads from the root
    namespace as the lab's Ceph admin, ``ceph.qemu_uri``). So ``qemu-img ... -f fmt path`` reads any of them.
    """

    dev: str
    path: str
    fmt: str
    #: Top first, as far as the XML lists it (``<backingStore>``): files and devices by path, RBD images as
    #: ``rbd:pool/image``.
    chain: tuple[str, ...]
    kind: str = "file"
    pool: str = ""
    image: str = ""

    @property
    def location(self) -> str:
        """Where the volume is, as the agent writes it: the file or device path, or ``rbd:pool/image``."""
        return f"rbd:{self.pool}/{self.image}" if self.kind == "rbd" else self.path


def _source_of(element: ET.Element) -> tuple[str, str, str] | None:
    """(kind, name, pool) of a ``<disk>`` or ``<backingStore>``: name is the file or device path, or for RBD
    the image's name in its pool; None for what the lab does not read (other network protocols, an empty
    drive, a volume of a libvirt pool)."""
    source = element.find("source")
    if source is None:
        return None
    disk_type = element.get("type") or "file"
    if disk_type == "file" and source.get("file"):
        return "file", source.get("file", ""), ""
    if disk_type == "block" and source.get("dev"):
        return "block", source.get("dev", ""), ""
    if disk_type == "network" and source.get("protocol") == "rbd":
        pool, _, image = (source.get("name") or "").partition("/")
        if pool and image:
            return "rbd", image, pool
    return None


def disks_in_xml(xml: str) -> list[DiskInXml]:
    disks = []
    for disk in ET.fromstring(xml).findall("./devices/disk[@device='disk']"):
        target = disk.find("target")
        top = _source_of(disk)
        if target is None or top is None:
            continue
        kind, name, pool = top
        driver = disk.find("driver")
        chain = [name if kind != "rbd" else f"rbd:{pool}/{name}"]
        store = disk.find("backingStore")
        while store is not None and (layer := _source_of(store)) is not None:
            chain.append(layer[1] if layer[0] != "rbd" else f"rbd:{layer[2]}/{layer[1]}")
            store = store.find("backingStore")
        disks.append(
            DiskInXml(
                dev=target.get("dev", ""),
                path=ceph.qemu_uri(name, pool=pool) if kind == "rbd" else name,
                fmt=(driver.get("type") if driver is not None else None) or "qcow2",
                chain=tuple(p for p in chain if p),
                kind=kind,
                pool=pool,
                image=name if kind == "rbd" else "",
            )
        )
    return disks


@dataclass(frozen=True)
class Placement:
    host: HostSpec
    state: str  # virsh domstate: running, paused, shut off, ...

    @property
    def active(self) -> bool:
        return self.state not in ("shut off", "crashed")


def placements(name: str) -> list[Placement]:
    """Every lab host that has the domain (running or only defined), active ones first."""
    found = []
    for host in HOSTS:
        proc = virsh_run(host, "domstate", name, timeout=30)
        if proc.returncode == 0:
            found.append(Placement(host, proc.stdout.strip()))
    return sorted(found, key=lambda p: not p.active)


def locate(name: str) -> Placement:
    found = placements(name)
    if not found:
        raise LabError(f"no lab host has a domain named {name!r}")
    return found[0]


def current_xml(placement: Placement, name: str) -> str:
    """The live XML of a running domain, else the persistent one (virsh gives whichever applies)."""
    return virsh(placement.host, "dumpxml", name)
