"""libvirt's snapshot metadata of a moving VM (issue 16, part two).

A chain made by ``virsh snapshot-create-as --disk-only`` comes with libvirt metadata: each snapshot's XML
names the overlay it created (``<disks><disk><source file=...>``) and the domain as it was (``<domain>``, its
disks on the layer below). After a move those paths must name the new files, or ``snapshot-list`` shows the
old ones and a revert goes back to the source storage. libvirt 9.0 refuses to migrate a domain that has
snapshot metadata at all ("cannot migrate domain with N snapshots"), so across hosts the metadata is taken
off the source before the migration (journalled first), redefined on the destination after it, and put back
on the source when the migration does not happen.

Internal snapshots (qcow2-internal, ``qemu-img snapshot -l``) live inside an image that a mirror does not
copy as such: a move would lose them, so it is refused before anything is copied.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import libvirt

from agent.errors import Code, PreflightFailed
from agent.storage.qemuimg import ImageInfo


@dataclass(frozen=True)
class SnapshotMeta:
    """One libvirt snapshot: its name, its XML (``VIR_DOMAIN_SNAPSHOT_XML_SECURE``) and whether it is the
    current one. Lists of them are in topological order: parents first, so they can be redefined in turn."""

    name: str
    xml: str
    current: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "xml": self.xml, "current": self.current}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SnapshotMeta:
        return cls(str(data["name"]), str(data["xml"]), bool(data["current"]))


def read_snapshots(dom: Any) -> list[SnapshotMeta]:
    """The domain's snapshot metadata, parents first (a blocking libvirt call: run it off the loop)."""
    snaps = dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)
    out = []
    for snap in snaps:
        out.append(
            SnapshotMeta(
                snap.getName(),
                snap.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE),
                bool(snap.isCurrent()),
            )
        )
    return out


def redefine_snapshots(dom: Any, snapshots: Sequence[SnapshotMeta]) -> None:
    """Define (or replace) each snapshot's metadata from its XML, parents first; the current one stays
    current. Nothing on disk changes (``VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE``)."""
    for snap in snapshots:
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        if snap.current:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
        dom.snapshotCreateXML(snap.xml, flags)


def drop_snapshot_metadata(dom: Any, snapshots: Iterable[SnapshotMeta]) -> None:
    """Remove the metadata only (children first); the image files are untouched."""
    for snap in reversed(list(snapshots)):
        dom.snapshotLookupByName(snap.name).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)


def rewrite_snapshot(xml: str, moved: Mapping[str, str]) -> str:
    """The snapshot's XML with every file path in ``moved`` (old -> new) replaced: the overlays it names and
    the disks (and their ``<backingStore>``) of the domain it recorded. Other paths stay."""
    root = ET.fromstring(xml)
    for source in root.iter("source"):
        path = source.get("file")
        if path is not None and path in moved:
            source.set("file", moved[path])
    return ET.tostring(root, encoding="unicode")


def snapshot_paths(xml: str) -> list[str]:
    """Every file path a snapshot's XML names."""
    return [p for s in ET.fromstring(xml).iter("source") if (p := s.get("file"))]


def refuse_internal(chains: Mapping[str, Sequence[ImageInfo]]) -> None:
    """Refuse a move of disks whose images hold internal (qcow2) snapshots, naming them."""
    found = [
        f"{target}: {layer.path} ({', '.join(layer.internal_snapshots)})"
        for target, chain in chains.items()
        for layer in chain
        if layer.internal_snapshots
    ]
    if found:
        raise PreflightFailed(
            "the VM has internal (qcow2) snapshots, which a live storage migration cannot keep: "
            + "; ".join(found),
            code=Code.INTERNAL_SNAPSHOTS,
            field="vmUuid",
            details="delete them (virsh snapshot-delete, qemu-img snapshot -d) or turn them into external "
            "snapshots before moving the VM",
        )
