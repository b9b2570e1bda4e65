"""libvirt snapshot metadata across a move (agent.migration.snapshots): the XML rewrite, the refusal."""

from __future__ import annotations

import pytest

from agent.errors import PreflightFailed
from agent.migration.snapshots import SnapshotMeta, refuse_internal, rewrite_snapshot, snapshot_paths
from agent.storage.qemuimg import ImageInfo

SNAPSHOT_XML = """<domainsnapshot>
  <name>s2</name>
  <state>disk-snapshot</state>
  <parent><name>s1</name></parent>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/ps1/s2.qcow2'/>
    </disk>
    <disk name='vdc' snapshot='no'/>
  </disks>
  <domain type='qemu'>
    <name>g</name>
    <devices>
      <disk type='file' device='disk'>
        <source file='/ps1/s1.qcow2'/>
        <backingStore type='file'><format type='qcow2'/><source file='/ps1/base.qcow2'/></backingStore>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='file' device='cdrom'><source file='/iso/boot.iso'/><target dev='vdc'/></disk>
    </devices>
  </domain>
</domainsnapshot>"""


def test_every_moved_path_is_rewritten_and_others_stay() -> None:
    moved = {"/ps1/s2.qcow2": "/ps2/s2.qcow2", "/ps1/s1.qcow2": "/ps2/s1.qcow2", "/ps1/base.qcow2": "/ps2/b"}
    out = rewrite_snapshot(SNAPSHOT_XML, moved)
    assert snapshot_paths(out) == ["/ps2/s2.qcow2", "/ps2/s1.qcow2", "/ps2/b", "/iso/boot.iso"]
    assert "<name>s2</name>" in out and "<parent><name>s1</name></parent>" in out
    assert rewrite_snapshot(SNAPSHOT_XML, {}) != "" and snapshot_paths(
        rewrite_snapshot(SNAPSHOT_XML, {})
    ) == (snapshot_paths(SNAPSHOT_XML))


def test_snapshot_meta_round_trips_through_the_journal() -> None:
    meta = SnapshotMeta("s2", SNAPSHOT_XML, True)
    assert SnapshotMeta.from_dict(meta.to_dict()) == meta


def test_internal_snapshots_are_refused_by_name() -> None:
    plain = ImageInfo("/ps1/a.qcow2", "qcow2", 1 << 30, 0, None, None, 65536)
    inside = ImageInfo("/ps1/b.qcow2", "qcow2", 1 << 30, 0, None, None, 65536, ("before-upgrade", "s2"))
    refuse_internal({"vda": [plain]})
    with pytest.raises(PreflightFailed) as info:
        refuse_internal({"vda": [plain], "vdb": [inside]})
    assert info.value.code == "AGENT.INTERNAL_SNAPSHOTS"
    assert "vdb: /ps1/b.qcow2 (before-upgrade, s2)" in info.value.description
