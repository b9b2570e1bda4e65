"""The destination side of a chain transfer (IncomingService) with real qemu-storage-daemon on loopback,
no libvirt: prepare, open a layer, send it, finish (verify), abort. The lab tests drive the same code
between two hosts; here the wire fields are checked one by one."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from test_transfer_support import LOOPBACK, MiB, create, needs_qemu, qemu_io, qsd_children

from agent.errors import AgentError
from agent.migration.incoming import IncomingDisk, IncomingLayer, IncomingService, IncomingSpec
from agent.storage import qemuimg
from agent.storage.roots import StorageRoot, StorageRoots
from agent.transfer.endpoint import NbdEndpoint
from agent.transfer.send import send_layer_to
from agent.transfer.verify import layer_digest

pytestmark = [needs_qemu]

ROOT_UUID = "2b7c1d0e5a6f4e3d9c8b7a6f5e4d3c2b"
PEER = "host:source"  # the caller's name the service binds each record to (agent/api/access.py)


def _service(tmp_path: Path) -> tuple[IncomingService, Path]:
    root = tmp_path / "dst"
    root.mkdir()
    service = IncomingService(
        StorageRoots([StorageRoot(ROOT_UUID, root)]),
        None,
        tmp_path / "state",
        peer_libvirt_uri="qemu+tcp://127.0.0.1/system",
        migration_address=LOOPBACK,
    )
    return service, root


async def _spec(layers: list[str], *, with_cluster_size: bool = True) -> IncomingSpec:
    wire = []
    for path in layers:
        info = await qemuimg.info(path)
        wire.append(
            IncomingLayer(
                name=Path(path).name,
                format=info.format,
                virtualSize=info.virtual_size,
                actualSize=info.actual_size,
                clusterSize=info.cluster_size if with_cluster_size else None,
            )
        )
    return IncomingSpec(
        migrationId=str(uuid.uuid4()),
        vmUuid=str(uuid.uuid4()),
        dstPrimaryStorageUuid=ROOT_UUID,
        disks=[
            IncomingDisk(
                target="vda",
                volumeUuid="v1",
                top="top.qcow2",
                format="qcow2",
                virtualSize=wire[0].virtualSize,
                estimatedBytes=MiB,
                flatten=False,
                layers=wire,
            )
        ],
    )


def _small_cluster_chain(src: Path) -> list[str]:
    """base <- mid with 4 KiB clusters and scattered small writes: base first."""
    src.mkdir()
    base = create(src / "base.qcow2", 32 * MiB, cluster_size=4096)
    qemu_io(base, "write -P 0x41 0 1M", "write -P 0x42 5000 3000", "write -P 0x43 17M 8k")
    mid = create(src / "mid.qcow2", 32 * MiB, Path(base), cluster_size=4096)
    qemu_io(mid, "write -P 0x51 8192 4096", "write -z 17M 4k", "write -P 0x52 30M 12k")
    return [base, mid]


async def _send(service: IncomingService, spec: IncomingSpec, index: int, src: str) -> dict[str, object]:
    opened = await service.open_layer(spec.migrationId, PEER, "vda", index)
    info = await qemuimg.info(src)
    await send_layer_to(src, info.format, NbdEndpoint.from_dict(opened["endpoint"]), rate=lambda: None)
    digest = await layer_digest(src, info.format)
    return await service.finish_layer(spec.migrationId, PEER, "vda", index, digest.to_dict())


async def test_layers_keep_their_cluster_size_and_verify(tmp_path: Path) -> None:
    service, root = _service(tmp_path)
    layers = _small_cluster_chain(tmp_path / "src")
    spec = await _spec(layers)
    answer = await service.prepare(spec, PEER)
    assert answer["disks"][0]["layers"] == [str(root / "base.qcow2"), str(root / "mid.qcow2")]

    for index, src in enumerate(layers):
        assert (await _send(service, spec, index, src))["verified"] is True

    for src in layers:
        dst = root / Path(src).name
        info = await qemuimg.info(str(dst))
        assert info.cluster_size == 4096
        assert (await layer_digest(str(dst), "qcow2")) == (await layer_digest(src, "qcow2"))
    mid = await qemuimg.info(str(root / "mid.qcow2"))
    assert mid.backing == str(root / "base.qcow2")
    assert qsd_children() == []


async def test_without_cluster_size_the_default_is_used(tmp_path: Path) -> None:
    """An older source that does not send clusterSize still gets a usable layer (64 KiB clusters)."""
    service, root = _service(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    base = create(src / "base.qcow2", 16 * MiB)
    qemu_io(base, "write -P 0x61 0 2M")
    spec = await _spec([base], with_cluster_size=False)
    await service.prepare(spec, PEER)
    assert (await _send(service, spec, 0, base))["verified"] is True
    assert (await qemuimg.info(str(root / "base.qcow2"))).cluster_size == 65536


async def test_abort_removes_every_layer_and_export(tmp_path: Path) -> None:
    service, root = _service(tmp_path)
    layers = _small_cluster_chain(tmp_path / "src")
    spec = await _spec(layers)
    await service.prepare(spec, PEER)
    await _send(service, spec, 0, layers[0])
    await service.open_layer(spec.migrationId, PEER, "vda", 1)  # left open: the source died mid-copy
    assert qsd_children()

    answer = await service.abort(spec.migrationId, PEER)

    # The open export removes its own partial layer; the rest is listed.
    assert set(answer["removed"]) >= {str(root / "top.qcow2"), str(root / "base.qcow2")}
    assert list(root.iterdir()) == []
    assert qsd_children() == []
    assert service.list_ids() == []


@pytest.mark.parametrize("cluster", [256, 3 * 1024 * 1024])
def test_an_impossible_cluster_size_is_refused_on_the_wire(cluster: int) -> None:
    with pytest.raises(ValueError, match="clusterSize"):
        IncomingLayer(name="x.qcow2", format="qcow2", virtualSize=MiB, actualSize=0, clusterSize=cluster)


async def test_a_layer_outside_the_spec_is_not_found(tmp_path: Path) -> None:
    service, _root = _service(tmp_path)
    layers = _small_cluster_chain(tmp_path / "src")
    spec = await _spec(layers)
    await service.prepare(spec, PEER)
    with pytest.raises(AgentError) as err:
        await service.open_layer(spec.migrationId, PEER, "vda", 2)
    assert err.value.field == "index"
    await service.abort(spec.migrationId, PEER)
