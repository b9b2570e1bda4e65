"""Planning rules: which disks move, where layers go, confinement, shared bases."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import InvalidRequest, PathOutsideRoot, StorageKindUnsupported
from agent.migration.plan import MigrationPlan, plan_migration, volume_uuid
from agent.migration.request import MigrationRequest
from agent.storage.qemuimg import ImageInfo
from agent.storage.roots import StorageRoot
from agent.virt.domxml import DiskXml

DST = "6f1c1d0e-59a4-4c43-9c0a-0a3c7f1f0b11"
GiB = 1024**3


def disk(target: str, source: str | None, **kw: object) -> DiskXml:
    base: dict[str, object] = dict(
        device="disk",
        type="file",
        format="qcow2",
        readonly=False,
        shareable=False,
        serial=None,
        boot_order=None,
        backing=(),
        mirror=False,
        mirror_ready=False,
    )
    base.update(kw)
    return DiskXml(target=target, source=source, **base)  # type: ignore[arg-type]


def layer(path: str, backing: str | None = None, actual: int = 10) -> ImageInfo:
    return ImageInfo(path, "qcow2", GiB, actual, backing, "qcow2" if backing else None, 65536)


def request(**psm: object) -> MigrationRequest:
    return MigrationRequest.model_validate({"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST, **psm}})


@pytest.fixture
def root(tmp_path: Path) -> StorageRoot:
    (tmp_path / "dst").mkdir()
    return StorageRoot(DST, tmp_path / "dst")


def chain3(prefix: str) -> list[ImageInfo]:
    return [
        layer(f"{prefix}/top.qcow2", f"{prefix}/mid.qcow2", 30),
        layer(f"{prefix}/mid.qcow2", f"{prefix}/base.qcow2", 20),
        layer(f"{prefix}/base.qcow2", None, 100),
    ]


def test_root_always_moves_data_only_when_asked(root: StorageRoot) -> None:
    disks = [disk("vda", "/src/a.qcow2", boot_order=1), disk("vdb", "/src/b.qcow2", serial="vol-b")]
    chains = {"vda": [layer("/src/a.qcow2")], "vdb": [layer("/src/b.qcow2")]}
    plan = plan_migration("vm", disks, chains, request(), root)
    assert [d.target for d in plan.disks] == ["vda"]
    assert plan.skipped[0].target == "vdb" and "withDataVolumes" in plan.skipped[0].reason
    plan = plan_migration("vm", disks, chains, request(withDataVolumes=True), root)
    assert [(d.target, d.role, d.volume_uuid) for d in plan.disks] == [
        ("vda", "Root", "a"),
        ("vdb", "Data", "vol-b"),
    ]
    assert plan.disks[0].dst_top == str(root.path / "a.qcow2")


def test_cdrom_readonly_shareable_network_stay_with_reasons(root: StorageRoot) -> None:
    disks = [
        disk("vda", "/src/a.qcow2"),
        disk("sda", None, device="cdrom", readonly=True),
        disk("vdb", "/src/ro.qcow2", readonly=True),
        disk("vdc", "/src/sh.raw", shareable=True),
        disk("vdd", None, type="network"),
    ]
    plan = plan_migration("vm", disks, {"vda": [layer("/src/a.qcow2")]}, request(withDataVolumes=True), root)
    reasons = {s.target: s.reason for s in plan.skipped}
    assert set(reasons) == {"sda", "vdb", "vdc", "vdd"}
    assert "cdrom" in reasons["sda"] and "read-only" in reasons["vdb"] and "shareable" in reasons["vdc"]


def test_with_snapshots_keeps_layers_with_rewritten_backing(root: StorageRoot) -> None:
    plan = plan_migration(
        "vm", [disk("vda", "/src/top.qcow2")], {"vda": chain3("/src")}, request(withSnapshots=True), root
    )
    (vda,) = plan.disks
    assert not vda.flatten
    assert [lp.src for lp in vda.lower_layers] == ["/src/base.qcow2", "/src/mid.qcow2"]
    base, mid = vda.lower_layers
    assert base.backing_dst is None and mid.backing_dst == base.dst == str(root.path / "base.qcow2")
    assert vda.dst_backing == mid.dst
    assert plan.bytes_total == 30 + 20 + 100
    assert MigrationPlan.from_dict(plan.to_dict()) == plan


def test_without_snapshots_flattens(root: StorageRoot) -> None:
    plan = plan_migration("vm", [disk("vda", "/src/top.qcow2")], {"vda": chain3("/src")}, request(), root)
    (vda,) = plan.disks
    assert vda.flatten and vda.lower_layers == () and vda.dst_backing is None
    assert vda.estimated_bytes == 150


def test_mirrors_are_shallow_unless_a_chain_is_flattened(root: StorageRoot) -> None:
    single = {"vda": [layer("/src/a.qcow2")], "vdb": [layer("/src/b.qcow2")]}
    disks = [disk("vda", "/src/a.qcow2"), disk("vdb", "/src/b.qcow2")]
    # Disks without a backing file: a shallow mirror onto a fresh image is the whole disk, real bytes only.
    assert plan_migration("vm", disks, single, request(withDataVolumes=True), root).shallow_mirrors
    chained = {**single, "vdb": [layer("/src/b.qcow2", "/src/b0.qcow2"), layer("/src/b0.qcow2")]}
    kept = request(withDataVolumes=True, withSnapshots=True)
    assert plan_migration("vm", disks, chained, kept, root).shallow_mirrors
    # Flattening one chain needs the full copy of every disk (libvirt has one mode for a migration).
    assert not plan_migration("vm", disks, chained, request(withDataVolumes=True), root).shallow_mirrors


def test_shared_base_is_planned_once(root: StorageRoot) -> None:
    a = [layer("/src/a.qcow2", "/cache/tmpl.qcow2"), layer("/cache/tmpl.qcow2", None, 500)]
    b = [layer("/src/b.qcow2", "/cache/tmpl.qcow2"), layer("/cache/tmpl.qcow2", None, 500)]
    plan = plan_migration(
        "vm",
        [disk("vda", "/src/a.qcow2"), disk("vdb", "/src/b.qcow2")],
        {"vda": a, "vdb": b},
        request(withSnapshots=True, withDataVolumes=True),
        root,
    )
    assert [lp.src for lp in plan.layers] == ["/cache/tmpl.qcow2"]
    assert plan.bytes_total == 500 + 10 + 10


def test_explicit_destination_confined(root: StorageRoot, tmp_path: Path) -> None:
    disks = [disk("vda", "/src/a.qcow2")]
    chains = {"vda": [layer("/src/a.qcow2")]}
    ok = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST},
            "volumes": [
                {"uuid": "v1", "installPath": "/src/a.qcow2", "dstInstallPath": str(root.path / "x.qcow2")}
            ],
        }
    )
    plan = plan_migration("vm", disks, chains, ok, root)
    assert plan.disks[0].dst_top == str(root.path / "x.qcow2") and plan.disks[0].volume_uuid == "v1"
    (root.path / "escape").symlink_to(tmp_path)
    for bad in ["/etc/x.qcow2", str(root.path / ".." / "x.qcow2"), str(root.path / "escape" / "x.qcow2")]:
        req = MigrationRequest.model_validate(
            {
                "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST},
                "volumes": [{"installPath": "/src/a.qcow2", "dstInstallPath": bad}],
            }
        )
        with pytest.raises(PathOutsideRoot) as err:
            plan_migration("vm", disks, chains, req, root)
        assert err.value.field == "volumes[0].dstInstallPath"


def test_root_disk_that_cannot_move_is_refused(root: StorageRoot) -> None:
    with pytest.raises(StorageKindUnsupported):
        plan_migration("vm", [disk("vda", None, type="network")], {}, request(), root)
    with pytest.raises(InvalidRequest):
        plan_migration("vm", [], {}, request(), root)


def test_volume_identity_order() -> None:
    req = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST},
            "volumes": [{"uuid": "from-request", "installPath": "/src/a.qcow2"}],
        }
    )
    assert volume_uuid(disk("vda", "/src/a.qcow2", serial="s"), req) == "from-request"
    assert volume_uuid(disk("vdb", "/src/b.qcow2", serial="s"), req) == "s"
    assert volume_uuid(disk("vdc", "/src/c.qcow2"), req) == "c"
