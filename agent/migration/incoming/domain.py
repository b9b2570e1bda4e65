"""The domain a source may define on this host: what it declared at prepare, with only the disk sources new.

At prepare the source sends the VM's definition as it is on the source (``IncomingSpec.domain``); the
destination keeps one digest per part (``domain_parts``): the root's attributes, every child of
``<domain>`` but ``<devices>``, and every device, numbered per tag. A disk's part leaves out what the move
changes (``agent.virt.domxml.rewrite_disk_sources``): its type, ``<source>``, ``<backingStore>``,
``<mirror>`` and the driver's format. ``check_definition`` then accepts only a definition whose parts are
the declared ones, whose ``<uuid>`` is the record's VM and whose every disk source is one of the record's
tops; a refusal names the part (``field``).
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Collection

from agent.errors import Code, InvalidRequest
from agent.virt.domxml import parse_disks

MISMATCH = Code.DOMAIN_MISMATCH


def _name(tag: str) -> str:
    # "{http://libvirt.org/schemas/domain/qemu/1.0}commandline" -> "qemu:commandline"
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return f"{namespace.rstrip('/').rsplit('/', 2)[-2]}:{local}" if "/" in namespace else local
    return tag


def _digest(elem: ET.Element) -> str:
    canonical = ET.canonicalize(ET.tostring(elem, encoding="unicode"), strip_text=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _without_disk_sources(disk: ET.Element) -> ET.Element:
    disk.attrib.pop("type", None)
    for tag in ("source", "backingStore", "mirror"):
        for node in disk.findall(tag):
            disk.remove(node)
    driver = disk.find("driver")
    if driver is not None:
        driver.attrib.pop("type", None)
        if set(driver.attrib.items()) <= {("name", "qemu")} and len(driver) == 0:
            disk.remove(driver)
    return disk


def _parse(xml: str, field: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InvalidRequest(f"not a domain XML: {err}", field=field) from err
    if root.tag != "domain":
        raise InvalidRequest(f"not a domain XML: the root is <{root.tag}>", field=field)
    return root


def domain_parts(xml: str, *, field: str = "domain") -> dict[str, str]:
    """Part name (``domain@``, ``name[0]``, ``devices/disk[1]``, ``qemu:commandline[0]``) -> digest."""
    root = _parse(xml, field)
    parts = {"domain@": hashlib.sha256(repr(sorted(root.attrib.items())).encode()).hexdigest()}
    counts: Counter[str] = Counter()

    def add(prefix: str, elem: ET.Element) -> None:
        name = f"{prefix}{_name(elem.tag)}"
        parts[f"{name}[{counts[name]}]"] = _digest(elem)
        counts[name] += 1

    for child in root:
        if child.tag != "devices":
            add("", child)
            continue
        for device in child:
            add("devices/", _without_disk_sources(device) if device.tag == "disk" else device)
    return parts


def domain_uuid(xml: str, *, field: str = "domain") -> str | None:
    node = _parse(xml, field).find("uuid")
    return None if node is None or node.text is None else node.text.strip()


def check_definition(
    xml: str, *, declared: dict[str, str] | None, vm_uuid: str, tops: Collection[str]
) -> None:
    """Raise ``InvalidRequest`` (``AGENT.DOMAIN_MISMATCH``, ``field`` naming the part) unless ``xml`` is the
    declared domain with the record's uuid and its disks on the record's tops only."""
    if declared is None:
        raise InvalidRequest(
            "the source declared no domain when it prepared this migration; nothing can be defined",
            code=MISMATCH,
            field="xml",
        )
    given = domain_parts(xml, field="xml")
    for part in sorted(set(declared) | set(given)):
        if declared.get(part) != given.get(part):
            what = "not declared" if part not in declared else "missing" if part not in given else "changed"
            raise InvalidRequest(
                f"the definition differs from the domain declared at prepare: {part} is {what}",
                code=MISMATCH,
                field=f"xml:{part}",
            )
    uuid = domain_uuid(xml, field="xml")
    if uuid is None or uuid.lower().replace("-", "") != vm_uuid.lower().replace("-", ""):
        raise InvalidRequest(
            f"the definition's uuid {uuid} is not the migration's VM {vm_uuid}",
            code=MISMATCH,
            field="xml:uuid",
        )
    for disk in parse_disks(xml):
        if disk.source is not None and disk.source not in tops:
            raise InvalidRequest(
                f"the definition's disk {disk.target} uses {disk.source}, not one of this migration's images",
                code=MISMATCH,
                field=f"xml:devices/disk[{disk.target}]",
            )
