"""The lab's agents as a client sees them: trusting the lab CA, an ``AgentClient`` for a lab host, health
and task views that ride out an agent restart. For the lab tests and the benchmark (it needs the agent's
virtualenv); the lab's own commands never import it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Protocol

from agent.client import AgentClient, AgentUnreachable
from labkit.agentctl import health_status


class AgentHost(Protocol):
    @property
    def agent_url(self) -> str: ...


class HasToken(Protocol):
    @property
    def token(self) -> str: ...


def trust_lab_ca(ca_file: str | None) -> None:
    """A TLS lab's agents answer on https with certificates of the lab CA: every client in this process
    verifies them with it. ``KSA_CA_FILE`` for ``AgentClient`` (and the CLI), ``SSL_CERT_FILE`` for urllib
    (OpenSSL's default verify paths, read at each new context); tests and the bench contact only the lab."""
    if ca_file:
        os.environ["KSA_CA_FILE"] = ca_file
        os.environ["SSL_CERT_FILE"] = ca_file


def agent_client(lab: HasToken, host: AgentHost) -> AgentClient:
    """A client of the host's agent with the lab's token (the lab CA trusted by ``trust_lab_ca``)."""
    return AgentClient(host.agent_url, lab.token)


def agent_healthy(url: str) -> bool:
    """``GET /v1/health`` answers 2xx within 3 s (``agentctl.health_status``: no proxy, sockets closed)."""
    status = health_status(url, timeout=3)
    return status is not None and 200 <= status < 300


async def task_view(
    lab: HasToken, host: AgentHost, task_uuid: str, *, patience_s: float = 60
) -> dict[str, Any]:
    """The task's view; an agent that is restarting (a test's kill, or another run sharing the lab) is asked
    again for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            async with agent_client(lab, host) as agent:
                return dict(await agent.task(task_uuid))
        except AgentUnreachable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
