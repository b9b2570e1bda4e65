"""Property-based tests of the domain XML reading and rewriting (issue 8).

Random domains (file, block and network disks, cdroms, backing chains, mirrors, serials, aliases, paths with
quotes, ampersands, angle brackets and non-ASCII letters) and random rewrites: the rewritten disks read back
with exactly the new file and format, no stale chain or mirror; every other disk and everything outside the
disks is untouched; rewriting twice is rewriting once; an unknown target is refused.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.virt.domxml import DiskXml, block_copy_dest_xml, parse_disks, rewrite_disk_sources

TARGETS = ["vda", "vdb", "vdc", "sda", "sdb", "hdc"]
# Any character XML 1.0 can carry in an attribute, path separators included.
PATH_CHARS = st.characters(
    blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00", min_codepoint=32, max_codepoint=0x2FFF
)
PATHS = st.builds(
    lambda parts: "/" + "/".join(parts),
    st.lists(st.text(PATH_CHARS, min_size=1, max_size=12), min_size=1, max_size=4),
)
FORMATS = st.sampled_from(["qcow2", "raw"])


@st.composite
def disk_xml(draw: st.DrawFn, target: str) -> str:
    kind = draw(st.sampled_from(["file", "file", "file", "block", "network"]))
    device = draw(st.sampled_from(["disk", "disk", "disk", "cdrom"]))
    parts = [f"<disk type={quoteattr(kind)} device={quoteattr(device)}>"]
    parts.append(f"<driver name='qemu' type={quoteattr(draw(FORMATS))}/>")
    if kind == "file" and draw(st.booleans()):
        parts.append(f"<source file={quoteattr(draw(PATHS))} index='3'/>")
        chain = draw(st.lists(st.tuples(PATHS, FORMATS), max_size=3))
        nested = "<backingStore/>"
        for path, fmt in reversed(chain):
            nested = (
                f"<backingStore type='file'><format type={quoteattr(fmt)}/>"
                f"<source file={quoteattr(path)}/>{nested}</backingStore>"
            )
        parts.append(nested)
    elif kind == "block":
        parts.append(f"<source dev={quoteattr(draw(PATHS))}/>")
    elif kind == "network":
        parts.append("<source protocol='nbd' name='x'><host name='h' port='10809'/></source>")
    parts.append(f"<target dev={quoteattr(target)} bus='virtio'/>")
    if draw(st.booleans()):
        parts.append(
            f"<serial>{escape(draw(st.text(PATH_CHARS, min_size=1, max_size=20)).strip() or 's')}</serial>"
        )
    if draw(st.booleans()):
        parts.append(f"<boot order='{draw(st.integers(1, 9))}'/>")
    if draw(st.booleans()):
        parts.append("<readonly/>")
    if draw(st.booleans()):
        parts.append(f"<alias name='virtio-disk{TARGETS.index(target)}'/>")
    if draw(st.booleans()):
        ready = draw(st.sampled_from(["", " ready='yes'", " ready='no'"]))
        parts.append(
            f"<mirror type='file' job='copy'{ready}><format type='qcow2'/>"
            f"<source file={quoteattr(draw(PATHS))}/></mirror>"
        )
    parts.append("</disk>")
    return "".join(parts)


@st.composite
def domains(draw: st.DrawFn) -> str:
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=5, unique=True))
    disks = [draw(disk_xml(t)) for t in targets]
    name = escape(draw(st.text(PATH_CHARS, min_size=1, max_size=16)))
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>5f8e3c1a-0000-4000-8000-000000000001</uuid>"
        "<memory unit='KiB'>262144</memory><os><type arch='x86_64'>hvm</type></os><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        + "".join(disks)
        + "<interface type='network'><source network='default'/></interface>"
        "<serial type='file'><source path='/var/log/x.log'/></serial></devices></domain>"
    )


def without_disks(xml: str, targets: set[str]) -> str:
    """The document minus the named disks, canonical: what a rewrite must not touch."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    assert devices is not None
    for disk in devices.findall("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") in targets:
            devices.remove(disk)
    return ET.tostring(root, encoding="unicode")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_rewrite_changes_exactly_the_named_disks(data: st.DataObject) -> None:
    xml = data.draw(domains())
    before = {d.target: d for d in parse_disks(xml)}
    chosen = data.draw(st.lists(st.sampled_from(sorted(before)), unique=True))
    new = {t: (data.draw(PATHS), data.draw(FORMATS)) for t in chosen}

    out = rewrite_disk_sources(xml, new)

    after = {d.target: d for d in parse_disks(out)}
    assert set(after) == set(before)
    for target, disk in after.items():
        if target in new:
            path, fmt = new[target]
            assert disk.type == "file" and disk.source == path and disk.format == fmt
            assert disk.backing == () and not disk.mirror and not disk.mirror_ready
            old = before[target]
            # Identity and flags the management plane relies on survive.
            assert (disk.device, disk.serial, disk.boot_order, disk.readonly, disk.alias) == (
                old.device,
                old.serial,
                old.boot_order,
                old.readonly,
                old.alias,
            )
        else:
            assert disk == before[target]
    assert without_disks(out, set(new)) == without_disks(xml, set(new))
    # Idempotent: a resumed task may rewrite the persistent definition again.
    again = rewrite_disk_sources(out, new)
    assert parse_disks(again) == parse_disks(out)


@settings(max_examples=100, deadline=None)
@given(xml=domains(), extra=st.sampled_from(["vdz", "xvda"]))
def test_unknown_target_is_refused(xml: str, extra: str) -> None:
    with pytest.raises(ValueError, match=extra):
        rewrite_disk_sources(xml, {extra: ("/p.qcow2", "qcow2")})


@settings(max_examples=300, deadline=None)
@given(path=PATHS, fmt=FORMATS)
def test_block_copy_destination_reads_back(path: str, fmt: str) -> None:
    (disk,) = parse_disks(f"<domain><devices>{block_copy_dest_xml(path, fmt)}</devices></domain>")
    assert disk == DiskXml(
        "", "disk", "file", path, fmt, False, False, None, None, (), False, False, location=path
    )
