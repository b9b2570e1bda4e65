"""Targets pre-created by the caller (what ZStack's FullCopy / IncCopy / block live migration need): the
planner moves exactly the listed disks and plans no lower layers; the check refuses a target of the wrong
format or size, a FullCopy target with a backing file, an IncCopy target without its chain or with a chain
whose content differs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.errors import InvalidRequest, PreflightFailed
from agent.migration.plan import plan_migration
from agent.migration.request import MigrationRequest
from agent.migration.targets import check_precreated_target, check_same_content_below
from agent.storage.qemuimg import ImageInfo
from agent.storage.roots import StorageRoot
from agent.virt.domxml import DiskXml

DST = "6f1c1d0e-59a4-4c43-9c0a-0a3c7f1f0b11"
MiB = 1024 * 1024
GiB = 1024 * MiB


def disk(target: str, source: str, **kw: object) -> DiskXml:
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


def precreated(volumes: list[dict[str, str]], **psm: object) -> MigrationRequest:
    return MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST, **psm},
            "volumes": volumes,
            "targetsPrecreated": True,
        }
    )


@pytest.fixture
def root(tmp_path: Path) -> StorageRoot:
    (tmp_path / "dst").mkdir()
    return StorageRoot(DST, tmp_path / "dst")


DISKS = [
    disk("vda", "/src/root.qcow2", boot_order=1),
    disk("vdb", "/src/b.qcow2"),
    disk("vdc", "/src/c.qcow2"),
]
CHAINS = {
    "vda": [layer("/src/root.qcow2", "/src/base.qcow2", 30), layer("/src/base.qcow2", None, 100)],
    "vdb": [layer("/src/b.qcow2")],
    "vdc": [layer("/src/c.qcow2")],
}


def test_only_the_listed_data_disk_moves(root: StorageRoot) -> None:
    request = precreated([{"installPath": "/src/b.qcow2", "dstInstallPath": str(root.path / "new-b.qcow2")}])
    plan = plan_migration("vm", DISKS, CHAINS, request, root)
    assert [d.target for d in plan.disks] == ["vdb"]
    (moved,) = plan.disks
    assert moved.precreated and moved.flatten and moved.dst_top == str(root.path / "new-b.qcow2")
    assert {s.target for s in plan.skipped} == {"vda", "vdc"}
    assert all("pre-created" in s.reason for s in plan.skipped)


def test_keep_chain_plans_no_lower_layers(root: StorageRoot) -> None:
    request = precreated(
        [{"installPath": "/src/root.qcow2", "dstInstallPath": str(root.path / "root.qcow2")}],
        withSnapshots=True,
    )
    plan = plan_migration("vm", DISKS, CHAINS, request, root)
    (moved,) = plan.disks
    assert not moved.flatten and moved.lower_layers == () and plan.layers == ()
    assert moved.estimated_bytes == 30  # only the top travels
    full = plan_migration(
        "vm",
        DISKS,
        CHAINS,
        precreated([{"installPath": "/src/root.qcow2", "dstInstallPath": str(root.path / "root.qcow2")}]),
        root,
    )
    assert full.disks[0].flatten and full.disks[0].estimated_bytes == 130


def test_listed_path_must_be_a_disk_and_have_a_target(root: StorageRoot) -> None:
    with pytest.raises(InvalidRequest) as err:
        plan_migration(
            "vm",
            DISKS,
            CHAINS,
            precreated([{"installPath": "/src/nope.qcow2", "dstInstallPath": str(root.path / "x.qcow2")}]),
            root,
        )
    assert err.value.field == "volumes[0]"
    with pytest.raises(InvalidRequest) as err:
        plan_migration("vm", DISKS, CHAINS, precreated([{"installPath": "/src/b.qcow2"}]), root)
    assert err.value.field == "volumes[0].dstInstallPath"
    readonly = [*DISKS[:1], disk("vdb", "/src/b.qcow2", readonly=True)]
    with pytest.raises(PreflightFailed):
        plan_migration(
            "vm",
            readonly,
            CHAINS,
            precreated([{"installPath": "/src/b.qcow2", "dstInstallPath": str(root.path / "b.qcow2")}]),
            root,
        )


def test_without_the_flag_nothing_changes(root: StorageRoot) -> None:
    request = MigrationRequest.model_validate(
        {"primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST, "withSnapshots": True}}
    )
    plan = plan_migration("vm", DISKS, CHAINS, request, root)
    assert [d.target for d in plan.disks] == ["vda"] and not plan.disks[0].precreated
    assert len(plan.layers) == 1


# -- the check, with real qemu-img ------------------------------------------------------------------------


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True, capture_output=True)


async def test_check_refuses_wrong_targets(tmp_path: Path) -> None:
    flat = tmp_path / "flat.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(flat), str(64 * MiB))
    chain = await check_precreated_target(
        str(flat), fmt="qcow2", virtual_size=64 * MiB, flatten=True, field="f"
    )
    assert [c.path for c in chain] == [str(flat)]
    cases = [
        (str(tmp_path / "missing.qcow2"), "qcow2", 64 * MiB, True, "missing"),
        (str(flat), "raw", 64 * MiB, True, "is qcow2"),
        (str(flat), "qcow2", 32 * MiB, True, "virtual size"),
        (str(flat), "qcow2", 64 * MiB, False, "no backing file"),
    ]
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(64 * MiB))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    cases.append((str(top), "qcow2", 64 * MiB, True, "needs a flat target"))
    for path, fmt, size, flatten, words in cases:
        with pytest.raises(PreflightFailed) as err:
            await check_precreated_target(path, fmt=fmt, virtual_size=size, flatten=flatten, field="f")
        assert err.value.code == "AGENT.TARGET_MISMATCH" and words in err.value.description, err.value
    base.unlink()  # an incomplete chain
    with pytest.raises(PreflightFailed) as err:
        await check_precreated_target(str(top), fmt="qcow2", virtual_size=64 * MiB, flatten=False, field="f")
    assert "incomplete" in err.value.description


async def test_same_host_chain_content_is_compared(tmp_path: Path) -> None:
    src_base, dst_base = tmp_path / "src-base.qcow2", tmp_path / "dst-base.qcow2"
    for path in (src_base, dst_base):
        qemu_img("create", "-q", "-f", "qcow2", str(path), str(64 * MiB))
    qemu_io(src_base, "write -P 65 1M 1M")
    qemu_img("convert", "-O", "qcow2", str(src_base), str(dst_base))  # an identical copy
    top = tmp_path / "target.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(dst_base), "-F", "qcow2", str(top))
    chain = await check_precreated_target(
        str(top), fmt="qcow2", virtual_size=64 * MiB, flatten=False, field="f"
    )
    await check_same_content_below(("/src/top.qcow2", str(src_base)), chain, "f")
    qemu_io(dst_base, "write -P 66 2M 1M")
    with pytest.raises(PreflightFailed) as err:
        await check_same_content_below(("/src/top.qcow2", str(src_base)), chain, "f")
    assert "differs" in err.value.description
