"""The agent over real TLS on loopback, with a cluster CA made by agent/pki.py: HTTPS for everyone with the CA
file, a cluster client certificate for agent-to-agent paths, no token sent in plain text to a peer."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from service_fakes import TOKEN, VM_1, FakeFactory, FakeInventory, Script, make_config

from agent import pki
from agent.api.app import make_app
from agent.client import AgentClient, AgentUnreachable, ApiError
from agent.config import AgentConfig
from agent.errors import InvalidRequest
from agent.migration.peer.client import peer_client
from agent.migration.request import MigrationRequest
from agent.security import client_context, server_context

UNKNOWN = "0f1e2d3c-4b5a-4968-8776-655443322110"


@dataclass
class TlsAgent:
    url: str
    config: AgentConfig
    ca_dir: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cluster")
    pki.init_ca(directory)
    pki.issue_host(directory, "agent-a", ["127.0.0.1"])
    pki.issue_host(directory, "agent-b", ["127.0.0.1"])
    return directory


def tls_config(tmp_path: Path, cluster: Path, host: str, **overrides: Any) -> AgentConfig:
    files = pki.HostPki(cluster / "hosts" / host)
    return make_config(
        tmp_path, tls_cert=str(files.cert), tls_key=str(files.key), tls_ca=str(files.ca), **overrides
    )


@pytest.fixture
async def agent_b(tmp_path: Path, cluster: Path, unused_tcp_port: int) -> AsyncIterator[TlsAgent]:
    config = tls_config(tmp_path, cluster, "agent-b", port=unused_tcp_port)
    app = make_app(config, token=TOKEN, engine_factory=FakeFactory(Script()), inventory=FakeInventory(VM_1))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port, ssl_context=server_context(config))
    await site.start()
    try:
        yield TlsAgent(f"https://127.0.0.1:{unused_tcp_port}", config, cluster)
    finally:
        await runner.cleanup()


async def test_api_over_https_verified_with_the_cluster_ca(agent_b: TlsAgent) -> None:
    ca_only = ssl.create_default_context(cafile=str(agent_b.config.tls_ca))
    async with AgentClient(agent_b.url, TOKEN, ssl_context=ca_only) as client:
        assert (await client.health())["status"] == "ok"
        host = await client.host()
        assert host["transport"] == "tls" and host["insecureTransport"] is False
    # The system's CAs do not know the cluster CA: the agent's certificate does not verify.
    async with AgentClient(agent_b.url, TOKEN) as client:
        with pytest.raises(AgentUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await client.health()


async def test_agent_to_agent_paths_need_a_cluster_certificate(
    agent_b: TlsAgent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca_only = ssl.create_default_context(cafile=str(agent_b.config.tls_ca))
    caplog.set_level(logging.WARNING, logger="agent.security")
    async with AgentClient(agent_b.url, TOKEN, ssl_context=ca_only) as client:
        with pytest.raises(ApiError) as refused:
            await client.request("GET", "v1", "incoming-migrations", "nope")
    assert refused.value.status == 401
    assert refused.value.error["code"] == "AGENT.CLUSTER_CERTIFICATE_REQUIRED"
    assert (
        "refused agent-to-agent call GET /v1/incoming-migrations/nope from 127.0.0.1: no client "
        "certificate from the cluster CA" in caplog.text
    )
    # Agent A's host certificate gets past the certificate check to the handler (an unknown id: 404).
    (tmp_path / "a").mkdir()
    config_a = tls_config(tmp_path / "a", agent_b.ca_dir, "agent-a")
    async with AgentClient(agent_b.url, TOKEN, ssl_context=client_context(config_a)) as client:
        with pytest.raises(ApiError) as missing:
            await client.request("GET", "v1", "incoming-migrations", UNKNOWN)
    assert missing.value.status == 404
    # ... and still needs the token (the second factor).
    async with AgentClient(agent_b.url, "wrong", ssl_context=client_context(config_a)) as client:
        with pytest.raises(ApiError) as wrong:
            await client.request("GET", "v1", "incoming-migrations", UNKNOWN)
    assert wrong.value.status == 401 and wrong.value.error["code"] == "AGENT.UNAUTHORIZED"


async def test_a_certificate_of_another_ca_fails_the_handshake(agent_b: TlsAgent, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue_host(other, "agent-a", ["127.0.0.1"])
    stranger = pki.HostPki(other / "hosts" / "agent-a")
    context = ssl.create_default_context(cafile=str(agent_b.config.tls_ca))
    context.load_cert_chain(stranger.cert, stranger.key)
    async with AgentClient(agent_b.url, TOKEN, ssl_context=context) as client:
        with pytest.raises(AgentUnreachable):
            await client.request("GET", "v1", "incoming-migrations", "nope")


def test_no_token_to_a_plain_http_peer_unless_insecure(tmp_path: Path, cluster: Path) -> None:
    request = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": "aa" * 16, "dstHostUuid": "bb" * 16},
            "dstHost": {"uuid": "bb" * 16, "agentUrl": "http://127.0.0.1:7070", "migrationAddress": "x"},
        }
    )
    with pytest.raises(InvalidRequest, match="not https://") as refused:
        peer_client(request, tls_config(tmp_path, cluster, "agent-a"))
    assert refused.value.field == "dstHost.agentUrl"
    assert peer_client(request, make_config(tmp_path, insecure_transport=True)).base_url.startswith("http://")


def test_peer_libvirt_uri_is_tls_unless_insecure(tmp_path: Path, cluster: Path) -> None:
    secure = tls_config(tmp_path, cluster, "agent-a", migration_address="10.0.0.2")
    assert secure.peer_uri() == "qemu+tls://10.0.0.2/system"
    insecure = make_config(tmp_path, insecure_transport=True, migration_address="10.0.0.2")
    assert insecure.peer_uri() == "qemu+tcp://10.0.0.2/system"


async def test_cli_verifies_the_agent_with_ca_file(agent_b: TlsAgent) -> None:
    async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "health", "--agent", agent_b.url, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await cli()
    assert code == 3 and "CERTIFICATE_VERIFY_FAILED" in out and "--ca-file" in out, out
    code, out = await cli("--ca-file", str(agent_b.config.tls_ca))
    assert code == 0, out
    code, out = await cli(env={"KSA_CA_FILE": str(agent_b.config.tls_ca)})
    assert code == 0, out


def test_a_source_never_sends_its_own_management_token(tmp_path: Path, cluster: Path) -> None:
    """Issue 22: without cluster_token_file a source sent its own token_file to every destination."""
    request = MigrationRequest.model_validate(
        {
            "primaryStorageMigrateVm": {"dstPrimaryStorageUuid": "aa" * 16, "dstHostUuid": "bb" * 16},
            "dstHost": {"uuid": "bb" * 16, "agentUrl": "https://127.0.0.1:7070", "migrationAddress": "x"},
        }
    )
    peer = peer_client(request, tls_config(tmp_path, cluster, "agent-a"))
    assert "Authorization" not in peer._auth_headers()
    (tmp_path / "cluster-token").write_text("the-cluster-token\n")
    config = tls_config(tmp_path, cluster, "agent-a", cluster_token_file=str(tmp_path / "cluster-token"))
    assert peer_client(request, config)._auth_headers() == {"Authorization": "Bearer the-cluster-token"}
