"""Across hosts onto another kind (issue 25), the parts that are pure logic: the source plans one raw volume
per disk named by its volume and leaves the placing to the destination, builds the destination XML from the
destination's answer, and refuses an answer of another kind; the destination refuses what its kinds cannot
take before it makes anything. The moves themselves are proven in the lab (test_kinds_crosshost.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from test_plan import DST, chain3, disk, layer, request

from agent.config import StorageKind
from agent.errors import Code, InvalidRequest, MigrationFailed, StorageKindUnsupported
from agent.migration.crosshost.params import placed
from agent.migration.incoming import IncomingDisk, IncomingService, IncomingSpec
from agent.migration.peer.wire import Prepared, PreparedDisk, PreparedRbd
from agent.migration.plan import KINDS, RemoteVolumes, plan_migration
from agent.migration.request import MigrationRequest
from agent.storage.blockdir import BlockDir
from agent.storage.rbdpool import RbdPool
from agent.storage.roots import StorageRoots
from agent.virt.domxml import rewrite_disk_sources

MiB = 1 << 20
SECRET = "0f0e0d0c-0b0a-4908-8706-050403020100"
DOMAIN = """<domain type='qemu'><name>vm</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/src/top.qcow2'/>
<target dev='vda' bus='virtio'/></disk></devices></domain>"""


def test_onto_a_remote_pool_each_disk_is_one_raw_volume_named_by_its_volume() -> None:
    plan = plan_migration(
        "vm",
        [disk("vda", "/src/top.qcow2", serial="vol-a")],
        {"vda": chain3("/src")},
        request(withSnapshots=True),
        RemoteVolumes(DST, StorageKind.RBD),
        kinds=KINDS,
    )
    (vda,) = plan.disks
    assert (vda.dst_top, vda.dst_kind, vda.dst_format, vda.flatten) == ("vol-a", StorageKind.RBD, "raw", True)
    assert vda.lower_layers == () and plan.layers == () and not vda.shallow
    assert "flattened" in plan.summary()["notes"][0]


def test_onto_remote_block_storage_the_destination_picks_unless_the_caller_named_a_device() -> None:
    req = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": DST, "withDataVolumes": True},
            "volumes": [{"installPath": "/src/b.qcow2", "dstInstallPath": "/dev/ksa/disk7"}],
        }
    )
    plan = plan_migration(
        "vm",
        [disk("vda", "/src/a.qcow2", serial="vol-a"), disk("vdb", "/src/b.qcow2", serial="vol-b")],
        {"vda": [layer("/src/a.qcow2")], "vdb": [layer("/src/b.qcow2")]},
        req,
        RemoteVolumes(DST, StorageKind.BLOCK),
        kinds=KINDS,
    )
    assert [(d.dst_top, d.dst_kind) for d in plan.disks] == [
        ("vol-a", StorageKind.BLOCK),
        ("/dev/ksa/disk7", StorageKind.BLOCK),
    ]


def test_the_destination_xml_names_the_volume_the_destination_placed() -> None:
    plan = plan_migration(
        "vm",
        [disk("vda", "/src/top.qcow2")],
        {"vda": [layer("/src/top.qcow2")]},
        request(),
        RemoteVolumes(DST, StorageKind.RBD),
        kinds=KINDS,
    )
    rbd = PreparedRbd(monitors=(("10.0.0.1", 6789),), user="ksalab", secretUuid=SECRET)
    answer = Prepared(
        migrationId=str(uuid.uuid4()),
        disks=(PreparedDisk(target="vda", top="rbd:ksa/top", kind=StorageKind.RBD, rbd=rbd),),
        libvirtUri="qemu+tls://10.0.0.2/system",
        migrationUri="tcp://10.0.0.2",
    )
    xml = rewrite_disk_sources(DOMAIN, {"vda": placed(answer, plan.disks[0])})
    assert 'type="network"' in xml and 'protocol="rbd" name="ksa/top"' in xml, xml
    assert f'uuid="{SECRET}"' in xml and 'username="ksalab"' in xml and 'type="raw"' in xml, xml

    a_file = Prepared.model_validate(
        {**answer.model_dump(), "disks": [{"target": "vda", "top": "/var/lib/x/top"}]}
    )
    with pytest.raises(MigrationFailed) as err:
        placed(a_file, plan.disks[0])
    assert err.value.code is Code.PEER_ERROR and "planned rbd" in err.value.description


def test_a_device_of_the_answer_is_sliced_to_the_disk() -> None:
    there = PreparedDisk(target="vda", top="/dev/ksa/disk0", kind=StorageKind.BLOCK, size=1024 * MiB)
    xml = rewrite_disk_sources(DOMAIN, {"vda": there.source("raw")})
    assert 'type="block"' in xml and 'dev="/dev/ksa/disk0"' in xml, xml
    assert f'<slice type="storage" offset="0" size="{1024 * MiB}"' in xml, xml


def _service(tmp_path: Path, storage: RbdPool | BlockDir) -> IncomingService:
    return IncomingService(
        StorageRoots([], [storage]),
        object(),  # type: ignore[arg-type]  # refused before libvirt is asked anything
        tmp_path / "state",
        peer_libvirt_uri="qemu+tcp://127.0.0.1/system",
        migration_address="127.0.0.1",
    )


def _spec(**disk: object) -> IncomingSpec:
    fields = {
        "target": "vda",
        "volumeUuid": "vol-a",
        "top": "vol-a",
        "format": "raw",
        "virtualSize": 1024 * MiB,
        "estimatedBytes": 64 * MiB,
        "flatten": True,
        **disk,
    }
    return IncomingSpec(
        migrationId=str(uuid.uuid4()),
        vmUuid=str(uuid.uuid4()),
        dstPrimaryStorageUuid=DST,
        disks=[IncomingDisk.model_validate(fields)],
    )


@pytest.mark.parametrize(
    "disk",
    [
        {"offline": True, "layers": [{"name": "vol-a", "format": "raw", "virtualSize": 1, "actualSize": 1}]},
        {
            "format": "qcow2",
            "flatten": False,
            "layers": [{"name": "b", "format": "qcow2", "virtualSize": 1, "actualSize": 1}],
        },
        {"format": "qcow2"},
    ],
    ids=["a stopped VM", "a kept chain", "qcow2"],
)
async def test_the_destination_refuses_what_an_rbd_pool_cannot_take_before_making_anything(
    tmp_path: Path, disk: dict[str, object]
) -> None:
    pool = RbdPool(DST, "ksa", "", (("10.0.0.1", 6789),), "ksalab", SECRET)
    service = _service(tmp_path, pool)
    with pytest.raises(StorageKindUnsupported) as err:
        await service.prepare(_spec(**disk), "host:source")
    assert err.value.field == "disks[0]" and "rbd" in err.value.description
    assert service.list_ids() == []


async def test_the_destination_takes_no_precreated_device(tmp_path: Path) -> None:
    service = _service(tmp_path, BlockDir(DST, tmp_path))
    with pytest.raises(InvalidRequest) as err:
        await service.prepare(_spec(precreated=True, top="/dev/x"), "host:source")
    assert err.value.field == "disks[0].precreated"
    assert service.list_ids() == []
