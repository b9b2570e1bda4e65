"""Planning a live move onto an RBD pool or a block storage: one raw volume per disk, a chain flattened
into it (and said so), a device picked smallest-first, confinement, the journal's round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_plan import DST, GiB, chain3, disk, layer, request

from agent.config import StorageKind
from agent.errors import Code, InvalidRequest, PathOutsideRoot, PreflightFailed, StorageKindUnsupported
from agent.migration.plan import (
    FILES_ONLY,
    KINDS,
    OFFLINE_KINDS,
    MigrationPlan,
    allocation_index,
    inspect_chains,
    plan_migration,
)
from agent.migration.request import MigrationRequest
from agent.storage.blockdir import BlockDir
from agent.storage.qemuimg import Extent, ImageInfo
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoot
from agent.virt.domxml import DiskXml, RbdAccess, block_copy_dest_xml

MiB = 1 << 20
ACCESS = RbdAccess((("10.0.0.1", 6789),), "ksalab", "0f0e0d0c-0b0a-4908-8706-050403020100")


@pytest.fixture
def pool() -> RbdPool:
    return RbdPool(DST, "ksa", "", ACCESS.monitors, ACCESS.user, ACCESS.secret_uuid)


def test_onto_rbd_each_disk_is_a_raw_image_named_by_its_volume(pool: RbdPool) -> None:
    disks = [disk("vda", "/src/a.qcow2", serial="vol-a"), disk("vdb", "/src/b.qcow2", serial="vol-b")]
    chains = {"vda": [layer("/src/a.qcow2")], "vdb": [layer("/src/b.qcow2")]}
    plan = plan_migration("vm", disks, chains, request(withDataVolumes=True), pool, dst_rbd=ACCESS)
    assert [(d.dst_top, d.dst_kind, d.dst_format, d.flatten) for d in plan.disks] == [
        ("rbd:ksa/vol-a", StorageKind.RBD, "raw", True),
        ("rbd:ksa/vol-b", StorageKind.RBD, "raw", True),
    ]
    xml = block_copy_dest_xml(plan.dst_source(plan.disks[0]))
    assert 'protocol="rbd" name="ksa/vol-a"' in xml and ACCESS.secret_uuid in xml and 'type="raw"' in xml
    assert MigrationPlan.from_dict(plan.to_dict()) == plan  # the journal keeps the pool's access


def test_onto_rbd_a_chain_is_flattened_and_the_plan_says_so(pool: RbdPool) -> None:
    plan = plan_migration(
        "vm", [disk("vda", "/src/top.qcow2")], {"vda": chain3("/src")}, request(withSnapshots=True), pool
    )
    (vda,) = plan.disks
    assert vda.flatten and vda.lower_layers == () and plan.layers == ()
    assert vda.estimated_bytes == 150
    assert "flattened" in plan.summary()["notes"][0] and "vda" in plan.summary()["notes"][0]


def test_an_rbd_target_must_be_in_the_destination_pool(pool: RbdPool) -> None:
    chains = {"vda": [layer("/src/a.qcow2")]}
    for asked, ok in (("rbd:ksa/mine", True), ("mine", True), ("rbd:other/mine", False), ("a/../b", False)):
        req = MigrationRequest.model_validate(
            {
                "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST},
                "volumes": [{"installPath": "/src/a.qcow2", "dstInstallPath": asked}],
            }
        )
        if ok:
            plan = plan_migration("vm", [disk("vda", "/src/a.qcow2")], chains, req, pool)
            assert plan.disks[0].dst_top == "rbd:ksa/mine"
        else:
            with pytest.raises((PathOutsideRoot, InvalidRequest)) as err:
                plan_migration("vm", [disk("vda", "/src/a.qcow2")], chains, req, pool)
            assert err.value.field == "volumes[0].dstInstallPath"


def test_onto_block_the_smallest_free_device_that_fits(tmp_path: Path) -> None:
    storage = BlockDir(DST, tmp_path)
    free = [(f"{tmp_path}/big", 4 * GiB), (f"{tmp_path}/small", GiB // 2), (f"{tmp_path}/fit", GiB)]
    disks = [disk("vda", "/src/a.qcow2"), disk("vdb", "/src/b.qcow2")]
    chains = {"vda": [layer("/src/a.qcow2")], "vdb": [layer("/src/b.qcow2")]}
    plan = plan_migration("vm", disks, chains, request(withDataVolumes=True), storage, free_devices=free)
    assert [(d.dst_top, d.dst_format, d.dst_kind) for d in plan.disks] == [
        (f"{tmp_path}/fit", "raw", StorageKind.BLOCK),
        (f"{tmp_path}/big", "raw", StorageKind.BLOCK),
    ]
    assert plan.dst_rbd is None


def test_onto_block_no_device_large_enough_is_refused_naming_the_disk_and_size(tmp_path: Path) -> None:
    storage = BlockDir(DST, tmp_path)
    with pytest.raises(PreflightFailed) as err:
        plan_migration(
            "vm",
            [disk("vda", "/src/a.qcow2")],
            {"vda": [layer("/src/a.qcow2")]},
            request(),
            storage,
            free_devices=[(f"{tmp_path}/small", GiB // 2)],
        )
    assert err.value.code == Code.NO_SPACE
    assert "vda" in err.value.description and str(GiB) in err.value.description


def test_a_precreated_rbd_image_is_the_target_and_a_device_is_refused(pool: RbdPool, tmp_path: Path) -> None:
    """ZStack makes the image first (ceph://pool/image): it is the target, whole, the chain flattened into
    it, never created nor removed by the agent. A device is the agent's to pick: refused."""
    req = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST, "withSnapshots": True},
            "targetsPrecreated": True,
            "volumes": [{"installPath": "/src/a.qcow2", "dstInstallPath": "ceph://ksa/x"}],
        }
    )
    chains = {"vda": chain3("/src/a.qcow2")}
    plan = plan_migration("vm", [disk("vda", "/src/a.qcow2")], chains, req, pool)
    (vda,) = plan.disks
    assert (vda.dst_top, vda.dst_kind, vda.dst_format) == ("rbd:ksa/x", StorageKind.RBD, "raw")
    assert vda.precreated and vda.flatten and not vda.shallow and not plan.layers
    with pytest.raises(InvalidRequest) as err:
        plan_migration(
            "vm", [disk("vda", "/src/a.qcow2")], chains, req, BlockDir(DST, tmp_path), free_devices=[]
        )
    assert err.value.field == "targetsPrecreated"


def test_a_raw_volume_on_a_larger_device_is_sliced_to_the_disk(tmp_path: Path) -> None:
    """QEMU's mirror wants a target of the source's size: libvirt's storage slice gives it, and the
    persistent definition keeps it (the guest sees the same disk after a restart)."""
    from agent.virt.domxml import parse_disks, rewrite_disk_sources

    storage = BlockDir(DST, tmp_path)
    plan = plan_migration(
        "vm",
        [disk("vda", "/src/a.qcow2")],
        {"vda": [layer("/src/a.qcow2")]},
        request(),
        storage,
        free_devices=[(f"{tmp_path}/d0", 2 * GiB)],
    )
    source = plan.dst_source(plan.disks[0])
    assert f'<slice type="storage" offset="0" size="{GiB}"' in block_copy_dest_xml(source)
    domain = (
        "<domain><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/src/a.qcow2'/><target dev='vda'/></disk></devices></domain>"
    )
    (moved,) = parse_disks(rewrite_disk_sources(domain, {"vda": source}))
    assert (moved.type, moved.source, moved.format, moved.slice_size) == (
        "block",
        f"{tmp_path}/d0",
        "raw",
        GiB,
    )


def test_a_device_claimed_by_one_move_is_refused_to_another() -> None:
    from agent.migration.volumes import CLAIMED_DEVICES, claim_devices

    claim_devices(["/blk/d0", "/blk/d1"])
    try:
        with pytest.raises(PreflightFailed) as err:
            claim_devices(["/blk/d2", "/blk/d1"])
        assert err.value.code == Code.TARGET_EXISTS and "/blk/d1" in err.value.description
        assert "/blk/d2" not in CLAIMED_DEVICES  # all or nothing
    finally:
        CLAIMED_DEVICES.difference_update({"/blk/d0", "/blk/d1"})


def test_a_running_block_copys_destination_counts_as_used() -> None:
    from agent.virt.domxml import mirror_targets

    xml = (
        "<domain><devices><disk type='file' device='disk'><source file='/a.qcow2'/><target dev='vda'/>"
        "<mirror type='block' job='copy'><source dev='/blk/d0'/><format type='raw'/></mirror></disk>"
        "<disk type='file' device='disk'><source file='/b.qcow2'/><target dev='vdb'/>"
        "<mirror type='network' job='copy'><source protocol='rbd' name='ksa/img'/></mirror></disk>"
        "</devices></domain>"
    )
    assert mirror_targets(xml) == ["/blk/d0", "rbd:ksa/img"]


def _rbd_disk(target: str, image: str, **kw: object) -> DiskXml:
    return disk(target, None, type="network", format="raw", location=f"rbd:{image}", **kw)


async def test_from_rbd_an_image_moves_to_a_file_of_its_name_where_the_move_reads_rbd(tmp_path: Path) -> None:
    root = StorageRoot(DST, tmp_path)
    disks = [_rbd_disk("vda", "ksa/vol-a", serial="vol-a"), disk("vdb", "/src/b.qcow2", serial="vol-b")]
    chains = await inspect_chains(disks[:1], {"vda": GiB})
    assert chains["vda"][0].path == "rbd:ksa/vol-a" and chains["vda"][0].virtual_size == GiB
    chains["vdb"] = [layer("/src/b.qcow2")]
    plan = plan_migration("vm", disks, chains, request(withDataVolumes=True), root, kinds=KINDS)
    vda = plan.disks[0]
    assert (vda.src_kind, vda.src_top, vda.dst_top, vda.dst_format, vda.flatten) == (
        StorageKind.RBD,
        "rbd:ksa/vol-a",
        f"{tmp_path}/vol-a",
        "raw",
        True,
    )
    assert vda.src_source(ACCESS).disk_type == "network"
    assert MigrationPlan.from_dict(plan.to_dict()) == plan
    assert StorageKind.RBD in OFFLINE_KINDS  # a stopped VM's too, with the pool's keyring
    # Where the move does not read RBD (a stopped VM across hosts) the root on RBD is refused, naming the
    # disk and its image.
    with pytest.raises(StorageKindUnsupported) as err:
        plan_migration("vm", disks, chains, request(withDataVolumes=True), root, kinds=FILES_ONLY)
    assert err.value.field == "vmUuid" and "vda (rbd:ksa/vol-a)" in err.value.description, err.value
    # A data volume on RBD stays where it is when the move does not read RBD.
    disks.reverse()
    chains["vdb"] = [layer("/src/b.qcow2")]
    plan = plan_migration("vm", disks, chains, request(withDataVolumes=True), root, kinds=FILES_ONLY)
    assert [d.target for d in plan.disks] == ["vdb"] and [s.target for s in plan.skipped] == ["vda"], plan


async def test_an_rbd_image_without_a_live_qemu_is_not_mapped(tmp_path: Path) -> None:
    root = StorageRoot(DST, tmp_path)
    plan = plan_migration(
        "vm",
        [_rbd_disk("vda", "ksa/a")],
        {"vda": [ImageInfo("rbd:ksa/a", "raw", GiB, GiB, None, None, None)]},
        request(),
        root,
        kinds=KINDS,
    )
    with pytest.raises(PreflightFailed):
        await allocation_index(plan.disks[0])
    mapped = await allocation_index(plan.disks[0], live=_extents)
    assert (mapped.total, mapped.end) == (3 * MiB, 9 * MiB)


async def _extents() -> list[Extent]:
    return [
        Extent(0, MiB, True, False, 0),
        Extent(MiB, 7 * MiB, False, True, 0),
        Extent(7 * MiB, 2 * MiB, True, False, 0),
    ]


def test_a_caller_names_an_rbd_source_by_rbd_or_ceph_location(tmp_path: Path) -> None:
    root = StorageRoot(DST, tmp_path)
    chains = {"vda": [ImageInfo("rbd:ksa/a", "raw", GiB, GiB, None, None, None)]}
    for named in ("rbd:ksa/a", "ceph://ksa/a"):
        req = MigrationRequest.model_validate(
            {
                "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST},
                "volumes": [{"installPath": named, "dstInstallPath": "moved.raw"}],
            }
        )
        plan = plan_migration("vm", [_rbd_disk("vda", "ksa/a")], chains, req, root, kinds=KINDS)
        assert plan.disks[0].dst_top == f"{tmp_path}/moved.raw"


def test_a_mirror_is_shallow_unless_it_flattens_or_its_target_may_hold_old_bytes(tmp_path: Path) -> None:
    """A full copy makes QEMU 7.2 zero the whole target first (zero clusters everywhere in a qcow2 file);
    it is kept for a flattened chain, a pre-created target and a block device."""
    one = {"vda": [layer("/src/a.qcow2")]}
    files = StorageRoot(DST, tmp_path)
    assert plan_migration("vm", [disk("vda", "/src/a.qcow2")], one, request(), files).disks[0].shallow
    kept = plan_migration(
        "vm", [disk("vda", "/src/top.qcow2")], {"vda": chain3("/src")}, request(withSnapshots=True), files
    )
    assert kept.disks[0].shallow and not kept.disks[0].flatten
    flat = plan_migration("vm", [disk("vda", "/src/top.qcow2")], {"vda": chain3("/src")}, request(), files)
    assert flat.disks[0].flatten and not flat.disks[0].shallow
    pool = RbdPool(DST, "ksa", "", ACCESS.monitors, ACCESS.user, ACCESS.secret_uuid)
    assert (
        plan_migration("vm", [disk("vda", "/src/a.qcow2")], one, request(), pool, dst_rbd=ACCESS)
        .disks[0]
        .shallow
    )
    devices = BlockDir(DST, tmp_path)
    onto = plan_migration(
        "vm", [disk("vda", "/src/a.qcow2")], one, request(), devices, free_devices=[(f"{tmp_path}/d", GiB)]
    )
    assert not onto.disks[0].shallow


def test_a_stopped_vms_device_is_read_through_its_slice_into_a_file_named_by_its_volume(
    tmp_path: Path,
) -> None:
    """Off a block device onto files (a stopped VM on one host): qemu-img reads the device through its
    format, cut to the disk's size (not probed, not the whole device), into a file named by the volume's
    uuid; across hosts (files only) the root on a device is refused, naming it."""
    root = StorageRoot(DST, tmp_path)
    dev = disk("vda", "/blk/d0", type="block", format="raw", serial="vol-a", slice_size=GiB)
    chains = {"vda": [ImageInfo("/blk/d0", "raw", GiB, GiB, None, None, None)]}
    plan = plan_migration("vm", [dev], chains, request(), root, kinds=OFFLINE_KINDS)
    (vda,) = plan.disks
    assert (vda.src_kind, vda.dst_top, vda.dst_format) == (StorageKind.BLOCK, f"{tmp_path}/vol-a", "raw")
    spec = json.loads(vda.src_image.removeprefix("json:"))
    assert spec == {"driver": "raw", "size": GiB, "file": {"driver": "host_device", "filename": "/blk/d0"}}
    with pytest.raises(StorageKindUnsupported) as err:
        plan_migration("vm", [dev], chains, request(), root)
    assert "vda (/blk/d0)" in err.value.description


def test_onto_rbd_with_its_keyring_a_chain_keeps_its_lower_layers_as_snapshots(pool: RbdPool) -> None:
    disks = [disk("vda", "/src/top.qcow2", serial="vol-a")]
    plan = plan_migration(
        "vm",
        disks,
        {"vda": chain3("/src")},
        request(withSnapshots=True),
        pool,
        dst_rbd=ACCESS,
        rbd_snapshots=None,
    )
    (vda,) = plan.disks
    assert (vda.dst_top, vda.dst_format, vda.flatten, vda.shallow) == ("rbd:ksa/vol-a", "raw", False, True)
    assert [(lp.src, lp.dst) for lp in vda.lower_layers] == [
        ("/src/base.qcow2", "rbd:ksa/vol-a@base"),
        ("/src/mid.qcow2", "rbd:ksa/vol-a@mid"),
    ]
    assert vda.dst_backing is None and vda.estimated_bytes == 30  # the top's data: the mirror's part
    assert plan.layers == vda.lower_layers
    assert "kept as snapshots of rbd:ksa/vol-a, oldest first: base, mid" in plan.summary()["notes"][0]
    assert MigrationPlan.from_dict(plan.to_dict()) == plan


def test_without_the_keyring_or_across_hosts_the_chain_is_flattened_saying_why(pool: RbdPool) -> None:
    why = "keeping them as RBD snapshots needs a keyring"
    plan = plan_migration(
        "vm",
        [disk("vda", "/src/top.qcow2")],
        {"vda": chain3("/src")},
        request(withSnapshots=True),
        pool,
        rbd_snapshots=why,
    )
    assert plan.disks[0].flatten and plan.layers == ()
    assert "flattened" in plan.summary()["notes"][0] and why in plan.summary()["notes"][0]


def test_layers_of_another_size_than_the_top_are_flattened(pool: RbdPool) -> None:
    chain = chain3("/src")
    chain[2] = dataclasses.replace(chain[2], virtual_size=chain[2].virtual_size // 2)  # grown since
    plan = plan_migration(
        "vm",
        [disk("vda", "/src/top.qcow2")],
        {"vda": chain},
        request(withSnapshots=True),
        pool,
        rbd_snapshots=None,
    )
    assert plan.disks[0].flatten and "differ in size" in plan.summary()["notes"][0]
