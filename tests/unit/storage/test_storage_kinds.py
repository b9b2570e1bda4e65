"""Primary storages of every kind (issue 25): agent.toml's ``[[storage]]`` entries of kind file, rbd and
block, where each says a volume is (``rbd:pool/image``, a device path, a file path) and how each confines
what the network names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.config import BlockStorageConfig, ConfigError, RbdStorageConfig, StorageKind, parse_config
from agent.errors import InvalidRequest, PathOutsideRoot, StorageKindUnsupported, StorageNotFound
from agent.storage.blockdir import BlockDir
from agent.storage.locations import RbdImage, parse_rbd
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoot, StorageRoots
from agent.virt.domxml import parse_disks

FILE_UUID = "7e3f9a10-2c4d-4b8e-a1f2-0c9d8e7f6a01"
RBD_UUID = "5b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"
BLOCK_UUID = "0a1b2c3d-4e5f-4061-8273-94a5b6c7d8e9"
SECRET = "42f70c62-a3e1-415f-bfc0-4ad1f8875fa0"


def _config(*storage: dict[str, Any]) -> dict[str, Any]:
    return {
        "token_file": "/etc/t",
        "host_uuid": "11111111-2222-4333-8444-555555555555",
        "storage": list(storage),
    }


def _rbd(**overrides: Any) -> dict[str, Any]:
    entry = {
        "uuid": RBD_UUID,
        "kind": "rbd",
        "pool": "ksa",
        "monitors": ["10.0.0.1:6789", "10.0.0.2", "[fd00::3]:3300"],
        "user": "ksalab",
        "secret_uuid": SECRET.replace("-", ""),
    }
    return entry | overrides


def test_a_config_names_storages_of_every_kind_and_file_stays_the_default() -> None:
    config = parse_config(
        _config(
            {"uuid": FILE_UUID, "path": "/var/lib/ksa/ps1"},
            _rbd(namespace="tenant1"),
            {"uuid": BLOCK_UUID, "kind": "block", "path": "/dev/ksa-vg"},
        )
    )
    file, rbd, block = config.storage
    assert file.kind == StorageKind.FILE and file.path == Path("/var/lib/ksa/ps1")
    assert isinstance(rbd, RbdStorageConfig) and rbd.pool == "ksa" and rbd.namespace == "tenant1"
    assert rbd.secret_uuid == SECRET  # normalised like every uuid
    assert rbd.monitor_hosts() == [("10.0.0.1", 6789), ("10.0.0.2", 6789), ("fd00::3", 3300)]
    assert isinstance(block, BlockStorageConfig) and block.path == Path("/dev/ksa-vg")


@pytest.mark.parametrize(
    ("entry", "key", "words"),
    [
        (_rbd(kind="lvm"), "storage.0", "'lvm'"),
        (_rbd(pool="a/b"), "storage.0.pool", "not a pool name"),
        (_rbd(namespace="x@y"), "storage.0.namespace", "not a namespace name"),
        (_rbd(user="client.ksalab"), "storage.0.user", "without 'client.'"),
        (_rbd(monitors=[]), "storage.0.monitors", "at least 1"),
        (_rbd(monitors=["10.0.0.1:99999"]), "storage.0.monitors", "port out of range"),
        (_rbd(secret_uuid="nope"), "storage.0.secret_uuid", "not a uuid"),
        ({k: v for k, v in _rbd().items() if k != "user"}, "storage.0.user", "Field required"),
        (_rbd(path="/x"), "storage.0.path", "Extra inputs"),
        ({"uuid": BLOCK_UUID, "kind": "block", "path": "dev/vg"}, "storage.0.path", "absolute"),
    ],
)
def test_a_bad_storage_entry_stops_the_config_naming_its_key(
    entry: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_config(entry), "agent.toml")
    assert f"agent.toml: {key}: " in str(err.value) and words in str(err.value)


def test_a_storage_uuid_is_one_storage_whatever_its_kind() -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config(_config({"uuid": RBD_UUID, "path": "/a"}, _rbd()))


@pytest.mark.parametrize(
    ("text", "image"),
    [
        ("rbd:ksa/vol-1", RbdImage("ksa", "", "vol-1")),
        ("rbd:ksa/tenant1/vol.2", RbdImage("ksa", "tenant1", "vol.2")),
        ("ceph://ksa/0123abcd", RbdImage("ksa", "", "0123abcd")),  # ZStack's installPath
    ],
)
def test_rbd_locations_name_pool_namespace_and_image(text: str, image: RbdImage) -> None:
    parsed = parse_rbd(text, "f")
    assert parsed == image
    assert str(parsed) == "rbd:" + parsed.spec and parse_rbd(str(parsed), "f") == parsed


@pytest.mark.parametrize("text", ["rbd:ksa", "rbd:ksa/a/b/c", "rbd:ksa/img@snap", "rbd:/img", "rbd:ksa/../x"])
def test_rbd_locations_that_ceph_would_not_take_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_rbd(text, "volumes[0].dstInstallPath")
    assert err.value.field == "volumes[0].dstInstallPath"


def test_an_rbd_storage_confines_images_to_its_pool_and_namespace() -> None:
    pool = RbdPool.from_config(RbdStorageConfig.model_validate(_rbd(namespace="t1")))
    assert pool.location == "rbd:ksa/t1"
    assert pool.confine("vol-1", "f") == RbdImage("ksa", "t1", "vol-1")
    assert pool.confine("rbd:ksa/t1/vol-1", "f") == RbdImage("ksa", "t1", "vol-1")
    assert pool.contains("rbd:ksa/t1/vol-1") and not pool.contains("rbd:ksa/vol-1")
    for outside in ("rbd:ksa/vol-1", "rbd:other/t1/vol-1", "/var/lib/x.qcow2", "a/b"):
        with pytest.raises(PathOutsideRoot) as err:
            pool.confine(outside, "volumes[1].dstInstallPath")
        assert err.value.field == "volumes[1].dstInstallPath"


@pytest.fixture
def block_dir(tmp_path: Path) -> BlockDir:
    """A directory of block devices as LVM makes one: symlinks to device nodes elsewhere (/dev/null is a
    character device: it stands for something that is not a block device)."""
    devices = sorted(Path("/sys/block").iterdir())
    assert devices, "this machine has no block device to link to"
    (tmp_path / "vg").mkdir()
    (tmp_path / "vg" / "lv1").symlink_to(Path("/dev") / devices[0].name)
    (tmp_path / "vg" / "chr").symlink_to("/dev/null")
    (tmp_path / "vg" / "file").write_bytes(b"")
    return BlockDir(BLOCK_UUID, tmp_path / "vg")


def test_a_block_storage_confines_by_name_in_its_directory(block_dir: BlockDir) -> None:
    lv = block_dir.path / "lv1"
    assert block_dir.confine("lv1", "f") == lv  # the name in the directory, not where the symlink points
    assert block_dir.confine(str(lv), "f") == lv
    assert block_dir.devices() == [lv]
    outside = [f"{block_dir.path}/../vg/lv1", "/dev/" + os.readlink(lv).rsplit("/", 1)[1], "sub/lv1"]
    for path in [*outside, "chr", "file", "missing"]:
        with pytest.raises(PathOutsideRoot):
            block_dir.confine(path, "f")


def test_roots_hand_out_any_kind_but_moves_only_onto_files(tmp_path: Path, block_dir: BlockDir) -> None:
    config = parse_config(
        _config(
            {"uuid": FILE_UUID, "path": str(tmp_path)},
            _rbd(),
            {"uuid": BLOCK_UUID, "kind": "block", "path": str(block_dir.path)},
        )
    )
    roots = StorageRoots.from_config(config)
    assert [r.kind for r in roots.every()] == ["file", "rbd", "block"]
    assert list(roots) == [StorageRoot(FILE_UUID, tmp_path)]
    assert roots.get(FILE_UUID).path == tmp_path
    for uuid, kind in ((RBD_UUID, "rbd"), (BLOCK_UUID, "block")):
        assert roots.storage(uuid).kind == kind
        with pytest.raises(StorageKindUnsupported) as err:
            roots.get(uuid, field="dstPrimaryStorageUuid")
        assert err.value.field == "dstPrimaryStorageUuid" and f"of kind {kind}" in err.value.description
    with pytest.raises(StorageNotFound):
        roots.storage("99999999-2222-4333-8444-555555555555")
    assert roots.owner_of_location("rbd:ksa/img") == roots.storage(RBD_UUID)
    assert roots.owner_of_location(str(block_dir.path / "lv1")) == roots.storage(BLOCK_UUID)
    assert roots.owner_of_location(str(tmp_path / "a.qcow2")) == roots.storage(FILE_UUID)
    assert roots.owner_of_location("rbd:other/img") is None


def test_the_domain_xml_names_each_disk_by_kind_and_location() -> None:
    xml = """<domain><devices>
      <disk type='file' device='disk'><source file='/ps1/a.qcow2'/><target dev='vda'/></disk>
      <disk type='block' device='disk'><source dev='/dev/ksa-vg/lv1'/><target dev='vdb'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='ksa/t1/img'>
        <host name='10.0.0.1' port='6789'/></source><target dev='vdc'/></disk>
      <disk type='network' device='disk'><source protocol='nbd' name='x'/><target dev='vdd'/></disk>
    </devices></domain>"""
    locations = {d.target: (d.type, d.source, d.location) for d in parse_disks(xml)}
    assert locations == {
        "vda": ("file", "/ps1/a.qcow2", "/ps1/a.qcow2"),
        "vdb": ("block", "/dev/ksa-vg/lv1", "/dev/ksa-vg/lv1"),
        "vdc": ("network", None, "rbd:ksa/t1/img"),
        "vdd": ("network", None, None),
    }


async def test_zstack_names_a_precreated_rbd_image_and_the_move_keeps_it() -> None:
    """ZStack makes the RBD image, then sends /vm/blklivemigration with newVolume ceph://pool/image: one
    pre-created target in that rbd storage, the chain flattened into it; a block device is still refused."""
    from agent.errors import StorageKindUnsupported
    from agent.zstack.translate import block_copy_request
    from agent.zstack.wire import BlockLiveMigrationCmd

    config = parse_config(_config(_rbd(), {"uuid": BLOCK_UUID, "kind": "block", "path": "/dev/ksa-vg"}))
    cmd = BlockLiveMigrationCmd.model_validate(
        {
            "vmUuid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "oldVolumePath": "/var/lib/ksa/ps1/vol.qcow2",
            "newVolume": {"installPath": "ceph://ksa/vol-1", "volumeUuid": "vol-1"},
            "bandwidth": 8,
        }
    )
    request = await block_copy_request(cmd, "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9", config, None)
    psm = request.primaryStorageMigrateVm
    assert (psm.dstPrimaryStorageUuid, psm.withSnapshots, request.targetsPrecreated) == (
        RBD_UUID,
        False,
        True,
    )
    (volume,) = request.volumes
    assert (volume.installPath, volume.dstInstallPath) == ("/var/lib/ksa/ps1/vol.qcow2", "ceph://ksa/vol-1")
    device = cmd.model_copy(
        update={"newVolume": cmd.newVolume.model_copy(update={"installPath": "/dev/ksa-vg/x"})}
    )
    with pytest.raises(StorageKindUnsupported):
        await block_copy_request(device, "1f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9", config, None)
