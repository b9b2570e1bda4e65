"""Secure by default (issue 17) on the real lab: what crosses the lab's link during a cross-host live
migration of the writing guest, encrypted and with the insecure switch; libvirtd and the agent refuse clients
without a certificate of the cluster CA, and say so in their logs."""

from __future__ import annotations

import dataclasses
import datetime
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentapi import migrate
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from labtools import Guest, Lab, LabHost

from agent import pki
from agent.client import AgentClient, AgentUnreachable, ApiError
from labkit import agentctl
from labkit.bodies import migration_body
from labkit.layout import CLUSTER_TOKEN_FILE, LIBVIRT_TLS_PORT, host_by_name
from labkit.records import MAGIC
from labkit.state import LabState
from labkit.sysutil import kill_pids
from labkit.virsh import virsh

pytestmark = pytest.mark.lab

CAPTURE = Path(__file__).with_name("capture.py")
#: What a plain-text stream of the writing guest shows: its on-disk records (NBD mirror), its console
#: acknowledgements (memory) and the filler of its base layer (0x41, labkit/guests.py).
NEEDLES = {"record": f"{MAGIC} vd", "ack": "KSA-ACK vd", "filler": "A" * 512}
INSECURE_PORT = 7071


@pytest.fixture
def tls_lab(lab_agents: Lab) -> Lab:
    if lab_agents.raw["transport"] != "tls":
        pytest.fail("the lab is insecure (scripts/lab up --insecure): run scripts/lab up", pytrace=False)
    return lab_agents


class Capture:
    """The AF_PACKET capture (capture.py) in one lab host's network namespace."""

    def __init__(self, host: LabHost) -> None:
        netns = f"/run/netns/{host_by_name(host.name).netns}"
        argv = ["nsenter", f"--net={netns}", sys.executable, str(CAPTURE), *NEEDLES.values()]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.result: dict[str, Any] = {}

    def stop(self) -> dict[str, Any]:
        if not self.result:
            self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=30)
            self.result = json.loads(out.strip().splitlines()[-1])
            self.result["hits"] = {name: self.result["hits"][n] for name, n in NEEDLES.items()}
        return self.result


@pytest.fixture
def capture_on() -> Iterator[Callable[[LabHost], Capture]]:
    started: list[Capture] = []

    def start(host: LabHost) -> Capture:
        capture = Capture(host)
        started.append(capture)
        return capture

    yield start
    for capture in started:
        if capture.proc.poll() is None:
            capture.proc.kill()
            capture.proc.communicate()


def to_host(dst: LabHost) -> dict[str, Any]:
    return migration_body(
        dst.root("ps1").uuid,
        dstHostUuid=dst.uuid,
        dstHost={"uuid": dst.uuid, "agentUrl": dst.agent_url, "migrationAddress": dst.migration_address},
        withDataVolumes=True,
        downTime=500,
        bandwidth=40,
    )


async def migrate_captured(
    lab: Lab, src: LabHost, dst: LabHost, guest: Guest, capture_on: Callable[[LabHost], Capture]
) -> dict[str, Any]:
    guest.wait_for_acks(10)
    capture = capture_on(dst)
    run = await migrate(lab, src, guest.uuid, to_host(dst))
    seen = capture.stop()
    assert run.state == "SUCCEEDED", run.task.get("error")
    assert guest.where() == {dst.name: "running"}
    guest.wait_for_acks(5)
    result = guest.verify()
    assert result.ok, result.output
    print(f"capture on {dst.name}: {seen}")
    # The guest's disks (flattened, filler included) and memory crossed: tens of MiB at least were seen.
    assert seen["bytes"] > 32 << 20, seen
    return seen


# Alone on its lab (`rates`): its capture must see every frame, and beside a second lab's guests on two
# cores it dropped some ("nothing proven", 2026-12-07).
@pytest.mark.rates
async def test_migration_streams_are_encrypted_and_plain_only_with_the_insecure_switch(
    tls_lab: Lab,
    make_guest: Callable[..., Guest],
    capture_on: Callable[[LabHost], Capture],
    insecure_agents: dict[str, LabHost],
) -> None:
    src, dst = tls_lab.host("hostA"), tls_lab.host("hostB")
    secure = await migrate_captured(tls_lab, src, dst, make_guest(data_volumes=1), capture_on)
    assert secure["hits"] == dict.fromkeys(NEEDLES, 0), "plain text of the guest on the wire over TLS"
    assert secure["drops"] == 0, "the capture missed frames: nothing proven"
    # The same with agents that have insecure_transport = true (same lab, same libvirtd): the capture sees
    # the guest's records, acknowledgements and filler, so it would have seen them above.
    plain_src, plain_dst = insecure_agents["hostA"], insecure_agents["hostB"]
    plain = await migrate_captured(tls_lab, plain_src, plain_dst, make_guest(data_volumes=1), capture_on)
    assert all(plain["hits"][needle] > 0 for needle in NEEDLES), plain["hits"]


@pytest.fixture
def insecure_agents(tls_lab: Lab) -> Iterator[dict[str, LabHost]]:
    """A second agent on each lab host with ``insecure_transport = true`` (http on another port, no
    VIR_MIGRATE_TLS); libvirtd stays on TLS (peer_libvirt_uri qemu+tls://, its own control connection)."""
    state = LabState.load()
    assert state is not None
    pids: list[int] = []
    hosts: dict[str, LabHost] = {}
    try:
        for host in tls_lab.hosts:
            pid, url = agentctl.start_twin(
                host_by_name(host.name), state.hosts[host.name], state.ceph, INSECURE_PORT
            )
            pids.append(pid)
            hosts[host.name] = dataclasses.replace(host, agent_url=url)
        yield hosts
    finally:
        kill_pids(pids, grace=30)


# --- who may talk to libvirtd -----------------------------------------------------------------------------


def libvirtd_log(host: LabHost) -> Path:
    return host_by_name(host.name).private_dir("/var/log/libvirt") / "libvirtd.log"


def self_signed(name: x509.Name) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    raw = serialization.PrivateFormat.TraditionalOpenSSL
    return cert.public_bytes(pem), key.private_bytes(pem, raw, serialization.NoEncryption())


def libvirtd_confirmation(host: LabHost, ca_file: str, cert: Path, key: Path) -> bytes:
    """A TLS client of libvirtd's port (what virsh does first): the handshake, then the one byte by which
    libvirtd confirms the client's certificate (it checks it after the handshake), b"" if it hung up."""
    context = ssl.create_default_context(cafile=ca_file)
    context.load_cert_chain(cert, key)
    with (
        socket.create_connection((host.address, LIBVIRT_TLS_PORT), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host.address) as tls,
    ):
        return tls.recv(1)


def new_log_lines(log: Path, before: int) -> str:
    time.sleep(0.5)
    with log.open() as handle:
        handle.seek(before)
        return handle.read()


@pytest.mark.parametrize("kind", ["self-signed", "another CA"])
def test_libvirtd_refuses_a_client_certificate_not_from_the_cluster_ca(
    tls_lab: Lab, tmp_path: Path, kind: str
) -> None:
    host = tls_lab.host("hostA")
    ca_file = tls_lab.raw["caFile"]
    operator = Path(tls_lab.raw["clientPki"])
    # The same DN as the operator's (on tls_allowed_dn_list): only the issuer differs.
    subject = x509.load_pem_x509_certificate((operator / "clientcert.pem").read_bytes()).subject
    log = libvirtd_log(host)
    before = log.stat().st_size
    if kind == "self-signed":
        cert, key = tmp_path / "clientcert.pem", tmp_path / "clientkey.pem"
        cert_pem, key_pem = self_signed(subject)
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        assert libvirtd_confirmation(host, ca_file, cert, key) == b"", "libvirtd let a self-signed client in"
    else:
        # virsh itself, with a whole pkipath of another CA (the server's certificate then fails on the
        # client's side too: the refusal asserted is libvirtd's, in its log).
        cluster = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        other = pki.issue_client(pki.init_ca(tmp_path / "other", cluster=str(cluster)).dir, "operator")
        with pytest.raises(AssertionError, match="failed to connect to the hypervisor"):
            virsh(
                f"qemu+tls://{host.address}/system?pkipath={other}",
                "hostname",
                timeout=30,
                failure=AssertionError,
            )
        cert, key = other / "clientcert.pem", other / "clientkey.pem"
        assert libvirtd_confirmation(host, ca_file, cert, key) == b""
    new = new_log_lines(log, before)
    assert "Certificate failed validation: The certificate hasn't got a known issuer" in new, new
    assert "authentication failed: Failed to verify peer's certificate" in new, new
    # The lab's own operator certificate is let in.
    own = libvirtd_confirmation(host, ca_file, operator / "clientcert.pem", operator / "clientkey.pem")
    assert own == b"\x01"
    assert host.virsh("hostname").strip() == host.name


def test_libvirtd_has_no_plain_tcp_listener(tls_lab: Lab) -> None:
    host = tls_lab.host("hostB")
    with pytest.raises(AssertionError, match="failed to connect"):
        virsh(f"qemu+tcp://{host.address}/system", "hostname", timeout=30, failure=AssertionError)


# --- who may call the agent's agent-to-agent endpoints ------------------------------------------------------


async def test_agent_refuses_agent_to_agent_calls_without_a_cluster_certificate(
    tls_lab: Lab, tmp_path: Path
) -> None:
    host = tls_lab.host("hostB")
    log = host_by_name(host.name).agent_log
    before = log.stat().st_size
    ca_only = ssl.create_default_context(cafile=tls_lab.raw["caFile"])
    migration_id = str(uuid.uuid4())
    async with AgentClient(host.agent_url, tls_lab.token, ssl_context=ca_only) as agent:
        with pytest.raises(ApiError) as refused:
            await agent.request("GET", "v1", "incoming-migrations", migration_id)
        assert (await agent.health())["status"] == "ok"  # the operator's calls with the CA file still work
    assert refused.value.status == 401
    assert refused.value.error["code"] == "AGENT.CLUSTER_CERTIFICATE_REQUIRED"
    new = new_log_lines(log, before)
    assert f"refused agent-to-agent call GET /v1/incoming-migrations/{migration_id} from " in new
    assert "no client certificate from the cluster CA" in new
    # A host certificate from another CA does not get through the handshake.
    other = tmp_path / "other"
    pki.init_ca(other)
    stranger = pki.issue_host(other, "hostA", [tls_lab.host("hostA").address])
    context = ssl.create_default_context(cafile=tls_lab.raw["caFile"])
    context.load_cert_chain(stranger.cert, stranger.key)
    async with AgentClient(host.agent_url, tls_lab.token, ssl_context=context) as agent:
        with pytest.raises((AgentUnreachable, ApiError)) as handshake:
            await agent.request("GET", "v1", "incoming-migrations", migration_id)
    assert isinstance(handshake.value, AgentUnreachable), handshake.value
    # The lab's hostA certificate (what hostA's agent presents) gets to the handler: unknown id, 404.
    own = pki.HostPki(host_by_name("hostA").private_dir("/etc/pki"))
    context = ssl.create_default_context(cafile=tls_lab.raw["caFile"])
    context.load_cert_chain(own.cert, own.key)
    async with AgentClient(host.agent_url, tls_lab.token, ssl_context=context) as agent:
        with pytest.raises(ApiError) as unknown:
            await agent.request("GET", "v1", "incoming-migrations", migration_id)
    assert unknown.value.status == 404


async def test_roles_on_the_lab_agents(tls_lab: Lab) -> None:
    """Issue 22 on the real agents: the cluster token alone opens nothing, a host certificate opens only the
    agent-to-agent paths, an operator certificate is the management plane's and no peer."""
    host = tls_lab.host("hostB")
    cluster_token = CLUSTER_TOKEN_FILE.read_text().strip()
    assert cluster_token != tls_lab.token
    ca_only = ssl.create_default_context(cafile=tls_lab.raw["caFile"])
    async with AgentClient(host.agent_url, cluster_token, ssl_context=ca_only) as agent:
        for path in (("v1", "vms"), ("v1", "tasks"), ("v1", "incoming-migrations")):
            with pytest.raises(ApiError) as alone:
                await agent.request("GET", *path)
            assert alone.value.status == 401, path
    own = pki.HostPki(host_by_name("hostA").private_dir("/etc/pki"))
    as_host_a = ssl.create_default_context(cafile=tls_lab.raw["caFile"])
    as_host_a.load_cert_chain(own.cert, own.key)
    async with AgentClient(host.agent_url, cluster_token, ssl_context=as_host_a) as agent:
        with pytest.raises(ApiError) as not_management:
            await agent.request("GET", "v1", "vms")
        assert not_management.value.status == 403
        offer = await agent.request("GET", "v1", "incoming-migrations")
        assert offer["hostUuid"] == host.uuid
    operator = Path(tls_lab.raw["clientPki"])
    as_operator = ssl.create_default_context(cafile=tls_lab.raw["caFile"])
    as_operator.load_cert_chain(operator / "clientcert.pem", operator / "clientkey.pem")
    async with AgentClient(host.agent_url, None, ssl_context=as_operator) as agent:
        assert "vms" in await agent.request("GET", "v1", "vms")
        with pytest.raises(ApiError) as no_peer:
            await agent.request("GET", "v1", "incoming-migrations")
        assert no_peer.value.status == 403
