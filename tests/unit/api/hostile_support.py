"""The hostile-peer suite's cluster and destination agent: a CA made by agent/pki.py with three hosts and an
operator, a second CA, and agent B (the real app over real TLS on loopback, real storage roots and
qemu-img) whose libvirt is a recorder of what it was asked to define. Each caller is a client with its own
certificate and token, as a real peer, operator or stranger would call."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from service_fakes import TOKEN, VM_1, FakeFactory, FakeInventory, Script, make_config

from agent import pki
from agent.api.app import make_app
from agent.api.keys import INCOMING
from agent.client import AgentClient
from agent.config import AgentConfig
from agent.errors import NotFound
from agent.security import server_context

CLUSTER_TOKEN = "cluster-token-for-tests"
MiB = 1024 * 1024


@dataclass
class DefineRecorder:
    """The destination's libvirt, as far as ``define`` goes: it records, defines nothing."""

    defined: list[str] = field(default_factory=list)

    async def define_xml(self, xml: str) -> None:
        self.defined.append(xml)

    async def domain_state(self, vm_uuid: str) -> str:
        raise NotFound(f"no VM {vm_uuid}")


@dataclass
class Destination:
    url: str
    config: AgentConfig
    cluster: Path
    root: Path  # storage root B's path
    state: Path
    libvirt: DefineRecorder

    def client(self, who: str, token: str | None = CLUSTER_TOKEN) -> AgentClient:
        """``who``: a host name of the cluster (its host certificate), ``operator``, ``stranger`` (a host
        certificate of another CA), or ``nobody`` (no certificate)."""
        context = ssl.create_default_context(cafile=str(self.config.tls_ca))
        if who == "operator":
            directory = self.cluster / "clients" / "operator"
            context.load_cert_chain(directory / "clientcert.pem", directory / "clientkey.pem")
        elif who == "stranger":
            files = pki.HostPki(self.cluster.parent / "other-ca" / "hosts" / "agent-a")
            context.load_cert_chain(files.cert, files.key)
        elif who != "nobody":
            files = pki.HostPki(self.cluster / "hosts" / who)
            context.load_cert_chain(files.cert, files.key)
        return AgentClient(self.url, token, ssl_context=context)

    def records(self) -> dict[str, bytes]:
        incoming = self.state / "incoming"
        return {str(p.relative_to(incoming)): p.read_bytes() for p in incoming.rglob("*") if p.is_file()}

    def files(self) -> dict[str, str]:
        """Every file in the storage roots, by path, with its content's digest."""
        roots = [self.root, self.root.parent / "rootA"]
        return {
            str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("pki")
    directory = top / "cluster"
    pki.init_ca(directory)
    for host in ("agent-a", "agent-b", "agent-c"):
        pki.issue_host(directory, host, ["127.0.0.1"])
    pki.issue_client(directory, "operator")
    pki.init_ca(top / "other-ca")
    pki.issue_host(top / "other-ca", "agent-a", ["127.0.0.1"])
    return directory


def qcow2(path: Path, size: int = 16 * MiB, *, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if data:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{data[0]:02x} 0 64k", str(path)],
            check=True,
            capture_output=True,
        )
    return path


async def start_destination(
    tmp_path: Path, cluster: Path, port: int, **overrides: Any
) -> AsyncIterator[Destination]:
    files = pki.HostPki(cluster / "hosts" / "agent-b")
    config = make_config(
        tmp_path,
        port=port,
        tls_cert=str(files.cert),
        tls_key=str(files.key),
        tls_ca=str(files.ca),
        **overrides,
    )
    app = make_app(
        config,
        token=TOKEN,
        cluster_token=CLUSTER_TOKEN,
        engine_factory=FakeFactory(Script()),
        inventory=FakeInventory(VM_1),
    )
    recorder = DefineRecorder()

    async def attach_libvirt(app: web.Application) -> None:
        incoming = app[INCOMING]
        assert incoming is not None
        incoming.host = recorder  # type: ignore[assignment]

    app.on_startup.append(attach_libvirt)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(config))
    await site.start()
    try:
        yield Destination(
            f"https://127.0.0.1:{port}", config, cluster, tmp_path / "rootB", config.state_dir, recorder
        )
    finally:
        await runner.cleanup()
