"""Hostile callers against the real agent over real TLS (issue 22): a certificate of a second CA, an
operator's certificate, another host's certificate replaying a record id, the cluster token without a
certificate, a peer on the management routes, and the repros of what a peer could make the destination do
(delete another VM's disk, define any domain). Each is refused with 4xx and leaves every file in the
storage roots, every incoming-migration record and libvirt's definitions as they were."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hostile_support import CLUSTER_TOKEN, Destination, MiB, cluster, qcow2, start_destination
from service_fakes import STORAGE_B, TOKEN, VM_1, FakeInventory, body, make_config

from agent.api.app import make_app
from agent.client import AgentClient, AgentUnreachable, ApiError

__all__ = ["cluster"]

VICTIM_VM = "vm-B/disk.qcow2"


@pytest.fixture
async def dst(tmp_path: Path, cluster: Path, unused_tcp_port: int) -> AsyncIterator[Destination]:
    async for destination in start_destination(tmp_path, cluster, unused_tcp_port):
        yield destination


def disk(top: str, **fields: Any) -> dict[str, Any]:
    return {
        "target": "vda",
        "volumeUuid": "v1",
        "top": top,
        "format": "qcow2",
        "virtualSize": 16 * MiB,
        "estimatedBytes": MiB,
        "flatten": True,
        **fields,
    }


def layer(name: str) -> dict[str, Any]:
    return {"name": name, "format": "qcow2", "virtualSize": 16 * MiB, "actualSize": MiB}


def spec(*disks: dict[str, Any], migration_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "migrationId": migration_id or str(uuid.uuid4()),
        "vmUuid": VM_1,
        "dstPrimaryStorageUuid": STORAGE_B,
        "disks": list(disks),
        **fields,
    }


async def refused(client: AgentClient, method: str, *path: str, json_body: Any = None) -> ApiError:
    async with client:
        with pytest.raises(ApiError) as err:
            await client.request(method, *path, json_body=json_body)
    assert 400 <= err.value.status < 500, err.value
    return err.value


async def call(client: AgentClient, method: str, *path: str, json_body: Any = None) -> Any:
    async with client:
        return await client.request(method, *path, json_body=json_body)


# -- who may call what ------------------------------------------------------------------------------------


async def test_the_cluster_token_without_a_certificate_opens_nothing(dst: Destination) -> None:
    before = (dst.files(), dst.records())
    for method, path in (("GET", ("v1", "vms")), ("GET", ("v1", "tasks")), ("GET", ("v1", "host"))):
        err = await refused(dst.client("nobody"), method, *path)
        assert err.status == 401 and err.error["code"] == "AGENT.CLUSTER_CERTIFICATE_REQUIRED"
    err = await refused(
        dst.client("nobody"), "POST", "v1", "incoming-migrations", json_body=spec(disk("new/d.qcow2"))
    )
    assert err.status == 401
    assert (dst.files(), dst.records()) == before


async def test_an_operator_certificate_is_no_peer(dst: Destination) -> None:
    before = (dst.files(), dst.records())
    for token in (CLUSTER_TOKEN, None):
        err = await refused(
            dst.client("operator", token=token),
            "POST",
            "v1",
            "incoming-migrations",
            json_body=spec(disk("new.qcow2")),
        )
        assert err.status == 403 and err.error["code"] == "AGENT.CLUSTER_CERTIFICATE_REQUIRED"
    assert (dst.files(), dst.records()) == before
    # ... and it is the management plane's: the management routes answer it without a token.
    assert (await call(dst.client("operator", token=None), "GET", "v1", "vms"))["vms"]


async def test_a_peer_is_no_management_plane(dst: Destination) -> None:
    before = (dst.files(), dst.records())
    for method, path, json_body in (
        ("GET", ("v1", "vms"), None),
        ("GET", ("v1", "tasks"), None),
        ("GET", ("v1", "vms", VM_1), None),
        ("POST", ("v1", "vms", VM_1, "storage-migrations"), body()),
    ):
        for token in (CLUSTER_TOKEN, TOKEN):
            err = await refused(dst.client("agent-a", token=token), method, *path, json_body=json_body)
            assert err.status == 403 and err.error["code"] == "AGENT.FORBIDDEN", (path, err)
    assert (dst.files(), dst.records()) == before


async def test_the_management_token_is_no_peer(dst: Destination) -> None:
    err = await refused(
        dst.client("nobody", token=TOKEN),
        "POST",
        "v1",
        "incoming-migrations",
        json_body=spec(disk("n.qcow2")),
    )
    assert err.status == 401 and err.error["code"] == "AGENT.CLUSTER_CERTIFICATE_REQUIRED"
    assert dst.files() == {} and dst.records() == {}


async def test_a_certificate_of_another_ca_fails_the_handshake(dst: Destination) -> None:
    async with dst.client("stranger") as client:
        with pytest.raises(AgentUnreachable):
            await client.request("POST", "v1", "incoming-migrations", json_body=spec(disk("n.qcow2")))
    assert dst.files() == {} and dst.records() == {}


async def test_another_host_replaying_a_record_id_is_refused(dst: Destination) -> None:
    migration_id = str(uuid.uuid4())
    await call(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        json_body=spec(disk("new.qcow2"), migration_id=migration_id),
    )
    before = (dst.files(), dst.records())
    assert any(path.endswith("new.qcow2") for path in before[0])
    replays = [
        ("POST", (), spec(disk("new.qcow2"), migration_id=migration_id)),
        ("GET", (migration_id,), None),
        ("GET", (migration_id, "vm"), None),
        ("POST", (migration_id, "layers"), {"target": "vda", "index": 0}),
        ("POST", (migration_id, "commit"), {}),
        ("POST", (migration_id, "define"), {"xml": "<domain/>"}),
        ("DELETE", (migration_id,), None),
    ]
    for method, suffix, json_body in replays:
        err = await refused(
            dst.client("agent-c"), method, "v1", "incoming-migrations", *suffix, json_body=json_body
        )
        assert err.status == 403 and err.error["code"] == "AGENT.NOT_YOUR_MIGRATION", (method, suffix, err)
    assert (dst.files(), dst.records()) == before
    # The peer that prepared it still may.
    aborted = await call(dst.client("agent-a"), "DELETE", "v1", "incoming-migrations", migration_id)
    assert aborted["state"] == "aborted" and dst.files() == {}


# -- what a peer may ask ----------------------------------------------------------------------------------


async def test_a_precreated_disk_with_layers_cannot_remove_another_vms_disk(dst: Destination) -> None:
    """The repro: a precreated top with a layer of the same name; opening layer 0 removed the file."""
    victim = qcow2(dst.root / VICTIM_VM, data=b"\x5a")
    before = (dst.files(), dst.records())
    migration_id = str(uuid.uuid4())
    evil = spec(disk(VICTIM_VM, precreated=True, layers=[layer("disk.qcow2")]), migration_id=migration_id)
    a = dst.client("agent-a")
    with pytest.raises(ApiError) as err:
        async with a:
            await a.request("POST", "v1", "incoming-migrations", json_body=evil)
            first = {"target": "vda", "index": 0}
            await a.request("POST", "v1", "incoming-migrations", migration_id, "layers", json_body=first)
    try:
        assert 400 <= err.value.status < 500
        assert err.value.error["field"] == "disks[0].layers"
        assert victim.exists() and (dst.files(), dst.records()) == before
    finally:
        async with dst.client("agent-a") as cleanup:  # an old agent's export, if any
            await cleanup.request("DELETE", "v1", "incoming-migrations", migration_id)


async def test_a_layer_never_overwrites_a_top(dst: Destination) -> None:
    err = await refused(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        json_body=spec(disk("vm-1/disk.qcow2", flatten=False, layers=[layer("disk.qcow2")])),
    )
    assert err.status == 400 and err.error["field"] == "disks[0].layers[0].name"
    assert dst.files() == {} and dst.records() == {}


async def test_a_layer_never_replaces_an_existing_file(dst: Destination) -> None:
    qcow2(dst.root / "vm-1" / "base.qcow2", data=b"\x11")
    before = (dst.files(), dst.records())
    err = await refused(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        json_body=spec(disk("vm-1/top.qcow2", flatten=False, layers=[layer("base.qcow2")])),
    )
    assert err.status == 409 and err.error["code"] == "AGENT.TARGET_EXISTS"
    assert (dst.files(), dst.records()) == before


def domain_xml(vm_uuid: str = VM_1, source: str = "/src/vm-1/disk.qcow2", extra: str = "") -> str:
    return (
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>vm-1</name><uuid>{vm_uuid}</uuid><memory unit='KiB'>65536</memory>"
        "<os><type arch='x86_64'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{source}'/>"
        "<target dev='vda' bus='virtio'/></disk>"
        f"</devices>{extra}</domain>"
    )


EXTRA_DISK = (
    "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb' bus='virtio'/></disk>"
)
COMMAND_LINE = (
    "<qemu:commandline><qemu:arg value='-monitor'/><qemu:arg value='tcp::4444'/></qemu:commandline>"
)
OTHER_VM = "11111111-2222-4333-8444-5555555555aa"


def hostile_definitions(top: str) -> dict[str, str]:
    with_extra_disk = domain_xml(source=top).replace("</devices>", EXTRA_DISK + "</devices>")
    return {
        "an extra block disk": with_extra_disk,
        "a qemu command line": domain_xml(source=top, extra=COMMAND_LINE),
        "another VM's uuid": domain_xml(OTHER_VM, source=top),
    }


async def _prepared_precreated(dst: Destination, **fields: Any) -> tuple[str, str]:
    top = qcow2(dst.root / "vm-1" / "disk.qcow2")
    migration_id = str(uuid.uuid4())
    await call(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        json_body=spec(disk("vm-1/disk.qcow2", precreated=True), migration_id=migration_id, **fields),
    )
    return migration_id, str(top)


@pytest.mark.parametrize("what", list(hostile_definitions("x")))
async def test_define_takes_no_domain_the_source_did_not_declare(dst: Destination, what: str) -> None:
    """The repro: a prepared migration's define accepted any domain XML whose disk pointed at its top."""
    migration_id, top = await _prepared_precreated(dst)
    before = (dst.files(), dst.records())
    err = await refused(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        migration_id,
        "define",
        json_body={"xml": hostile_definitions(top)[what]},
    )
    assert err.error["code"] == "AGENT.DOMAIN_MISMATCH"
    assert dst.libvirt.defined == [] and (dst.files(), dst.records()) == before


@pytest.mark.parametrize(
    ("what", "part"),
    [
        ("an extra block disk", "xml:devices/disk[1]"),
        ("a qemu command line", "xml:qemu:commandline[0]"),
        ("another VM's uuid", "xml:uuid[0]"),
    ],
)
async def test_define_takes_only_the_declared_domain(dst: Destination, what: str, part: str) -> None:
    migration_id, top = await _prepared_precreated(dst, domain=domain_xml())
    before = (dst.files(), dst.records())
    err = await refused(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        migration_id,
        "define",
        json_body={"xml": hostile_definitions(top)[what]},
    )
    assert err.status == 400 and err.error["code"] == "AGENT.DOMAIN_MISMATCH"
    assert err.error["field"] == part
    assert dst.libvirt.defined == [] and (dst.files(), dst.records()) == before
    # The declared domain on the prepared top is defined.
    answer = await call(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        migration_id,
        "define",
        json_body={"xml": domain_xml(source=top)},
    )
    assert answer["state"] == "defined" and len(dst.libvirt.defined) == 1


async def test_a_declared_domain_of_another_vm_is_refused_at_prepare(dst: Destination) -> None:
    err = await refused(
        dst.client("agent-a"),
        "POST",
        "v1",
        "incoming-migrations",
        json_body=spec(disk("new.qcow2"), domain=domain_xml(OTHER_VM)),
    )
    assert err.status == 400 and err.error["field"] == "domain"
    assert dst.files() == {} and dst.records() == {}


async def test_insecure_transport_knows_peers_by_the_cluster_token(tmp_path: Path) -> None:
    """No certificates over plain HTTP: the cluster token makes a peer (and nothing more); the agent's own
    token makes a management caller, and a peer too (a source may be handed it as dstHost.token)."""
    config = make_config(tmp_path, insecure_transport=True)
    app = make_app(config, token=TOKEN, cluster_token=CLUSTER_TOKEN, inventory=FakeInventory(VM_1))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        cluster = {"Authorization": f"Bearer {CLUSTER_TOKEN}"}
        own = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/v1/incoming-migrations", headers=cluster)).status == 200
        assert (await client.get("/v1/vms", headers=cluster)).status == 403
        assert (await client.get("/v1/vms", headers=own)).status == 200
        assert (await client.get("/v1/incoming-migrations", headers=own)).status == 200
        assert (await client.get("/v1/vms", headers={"Authorization": "Bearer nope"})).status == 401
