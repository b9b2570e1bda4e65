"""RBD images through a transient libvirt rbd pool (agent/storage/rbdimages.py), against a fake connection:
the pool's XML, the secret checks and what each refusal says, create / exists / remove."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import libvirt
import pytest

from agent.errors import Code, PreflightFailed, StorageKindUnsupported
from agent.storage import rbdimages
from agent.storage.locations import RbdImage
from agent.storage.rbdpool import RbdPool
from agent.virt.host import VirtHost

SECRET = "4ab233ff-3057-42ed-9796-a6190e23bdf5"
STORAGE = RbdPool("6c1e4a52-0000-4000-8000-000000000001", "ksa", "", (("10.0.0.1", 6789),), "ksalab", SECRET)


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, 0, message, 2, None, None, None, 0, 0)
    return err


class FakeSecret:
    def __init__(self, usage: int) -> None:
        self.usage = usage

    def usageType(self) -> int:
        return self.usage

    def usageID(self) -> str:
        return "client.ksalab secret"


class FakeVolume:
    def __init__(self, pool: FakePool, name: str) -> None:
        self.pool, self.name = pool, name

    def delete(self, flags: int) -> None:
        assert flags == libvirt.VIR_STORAGE_VOL_DELETE_WITH_SNAPSHOTS
        del self.pool.volumes[self.name]


class FakePool:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.volumes: dict[str, int] = {}
        self.active = True
        self.refreshed = 0

    def _connect(self) -> None:
        if self.conn.pool_error is not None:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, self.conn.pool_error)

    def isActive(self) -> bool:
        return self.active

    def create(self, flags: int) -> None:
        self._connect()
        self.active = True

    def refresh(self, flags: int) -> None:
        self._connect()
        self.refreshed += 1

    def info(self) -> list[int]:
        return [2, 32 << 30, 1 << 30, 31 << 30]

    def createXML(self, xml: str, flags: int) -> FakeVolume:
        vol = ET.fromstring(xml)
        assert vol.find("target/format").get("type") == "raw"  # type: ignore[union-attr]
        self.volumes[vol.findtext("name") or ""] = int(vol.findtext("capacity") or 0)
        return FakeVolume(self, vol.findtext("name") or "")

    def listVolumes(self) -> list[str]:
        return list(self.volumes)

    def storageVolLookupByName(self, name: str) -> FakeVolume:
        return FakeVolume(self, name)


class FakeConnection:
    def __init__(self) -> None:
        self.secrets: dict[str, FakeSecret] = {SECRET: FakeSecret(libvirt.VIR_SECRET_USAGE_TYPE_CEPH)}
        self.pools: dict[str, FakePool] = {}
        self.pool_xml: list[str] = []
        self.pool_error: str | None = None

    def isAlive(self) -> int:
        return 1

    def close(self) -> None: ...

    def secretLookupByUUIDString(self, uuid: str) -> FakeSecret:
        if uuid not in self.secrets:
            raise libvirt_error(libvirt.VIR_ERR_NO_SECRET, f"no secret with matching uuid '{uuid}'")
        return self.secrets[uuid]

    def storagePoolLookupByName(self, name: str) -> FakePool:
        if name not in self.pools:
            raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_POOL, f"no storage pool '{name}'")
        return self.pools[name]

    def storagePoolCreateXML(self, xml: str, flags: int) -> FakePool:
        self.pool_xml.append(xml)
        pool = FakePool(self)
        pool._connect()
        self.pools[ET.fromstring(xml).findtext("name") or ""] = pool
        return pool


@pytest.fixture
async def conn_host() -> AsyncIterator[tuple[FakeConnection, VirtHost]]:
    conn = FakeConnection()
    host = VirtHost("test:///fake")
    host._conn = conn
    yield conn, host
    await host.close()


def test_the_pool_names_the_secret_and_the_monitors() -> None:
    pool = ET.fromstring(rbdimages.pool_xml(STORAGE))
    assert pool.get("type") == "rbd" and pool.findtext("name") == f"ksa-rbd-{STORAGE.uuid}"
    assert pool.findtext("source/name") == "ksa"
    assert [(h.get("name"), h.get("port")) for h in pool.findall("source/host")] == [("10.0.0.1", "6789")]
    auth = pool.find("source/auth")
    assert auth is not None and auth.get("username") == "ksalab" and auth.get("type") == "ceph"
    assert auth.find("secret").get("uuid") == SECRET  # type: ignore[union-attr]


async def test_create_exists_remove(conn_host: tuple[FakeConnection, VirtHost]) -> None:
    conn, host = conn_host
    image = RbdImage("ksa", "", "vol-1")
    assert not await rbdimages.image_exists(host, STORAGE, image)
    await rbdimages.create_image(host, STORAGE, image, 64 << 20)
    assert conn.pools[f"ksa-rbd-{STORAGE.uuid}"].volumes == {"vol-1": 64 << 20}
    assert await rbdimages.image_exists(host, STORAGE, image)
    assert len(conn.pool_xml) == 1  # made once, refreshed after
    assert await rbdimages.remove_image(host, STORAGE, image)
    assert not await rbdimages.remove_image(host, STORAGE, image)
    room = await rbdimages.check_access(host, STORAGE)
    assert room.known and room.available == 31 << 30


async def test_a_missing_secret_is_refused_naming_it(conn_host: tuple[FakeConnection, VirtHost]) -> None:
    conn, host = conn_host
    del conn.secrets[SECRET]
    with pytest.raises(PreflightFailed) as err:
        await rbdimages.check_access(host, STORAGE)
    assert err.value.code is Code.CEPH_ACCESS
    assert f"no secret {SECRET}" in err.value.description and "client.ksalab" in err.value.description
    assert conn.pool_xml == []  # nothing was made


async def test_a_secret_of_another_usage_is_refused(conn_host: tuple[FakeConnection, VirtHost]) -> None:
    conn, host = conn_host
    conn.secrets[SECRET] = FakeSecret(libvirt.VIR_SECRET_USAGE_TYPE_VOLUME)
    with pytest.raises(PreflightFailed) as err:
        await rbdimages.check_access(host, STORAGE)
    assert "not of usage 'ceph'" in err.value.description


async def test_a_key_that_does_not_open_the_pool_is_refused(
    conn_host: tuple[FakeConnection, VirtHost],
) -> None:
    conn, host = conn_host
    conn.pool_error = "failed to connect to the RADOS monitor on: 10.0.0.1:6789,: Permission denied"
    with pytest.raises(PreflightFailed) as err:
        await rbdimages.check_access(host, STORAGE)
    assert err.value.code is Code.CEPH_ACCESS
    assert (
        f"the key in libvirt secret {SECRET} does not open pool ksa as client.ksalab" in err.value.description
    )
    assert "Permission denied" in err.value.description


async def test_a_namespace_is_not_done(conn_host: tuple[FakeConnection, VirtHost]) -> None:
    _conn, host = conn_host
    storage = RbdPool(STORAGE.uuid, "ksa", "tenant1", STORAGE.monitors, "ksalab", SECRET)
    with pytest.raises(StorageKindUnsupported):
        await rbdimages.check_access(host, storage)


def test_room_unknown_when_the_cluster_reports_no_sizes() -> None:
    assert not rbdimages.Room(0, 0, 0).known
    assert rbdimages.Room(1, 0, 1).known
