"""Agent-to-agent calls from a source agent to a destination agent."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agent.client import AgentClient, ApiError, ClientError
from agent.config import AgentConfig
from agent.errors import Code, InvalidRequest, MigrationFailed, NotFound
from agent.migration.request import MigrationRequest
from agent.security import client_context

log = logging.getLogger(__name__)

#: How long a source waits for a destination whose limits are full (429 AGENT.BUSY) before it fails.
BUSY_WAIT_S = 120.0
#: Between two tries.
BUSY_RETRY_S = 10.0


def peer_client(request: MigrationRequest, config: AgentConfig) -> AgentClient:
    """A client of the destination agent: over TLS, verifying the peer with the cluster CA and presenting
    this host's certificate (what identifies this agent there), with the token handed over in the request,
    else the cluster token, as a second factor. This agent's own management token never goes to a peer; a
    token never goes out over plain HTTP unless ``insecure_transport`` says so."""
    dst = request.dstHost
    if dst is None or not dst.agentUrl:
        raise InvalidRequest("a move to another host needs dstHost.agentUrl", field="dstHost.agentUrl")
    if not config.insecure_transport and not dst.agentUrl.lower().startswith("https://"):
        raise InvalidRequest(
            f"dstHost.agentUrl {dst.agentUrl} is not https://: this agent sends no token in plain text "
            "(insecure_transport is off)",
            field="dstHost.agentUrl",
        )
    token = dst.token or config.read_cluster_token()
    return AgentClient(dst.agentUrl, token, ssl_context=client_context(config))


async def peer_call(peer: AgentClient, method: str, segments: tuple[str, ...], body: Any) -> Any:
    """Agent-to-agent call; the destination's ErrorCode is carried as the cause."""
    try:
        return await peer.request(method, *segments, json_body=body)
    except ApiError as err:
        error = err.error or {}
        if err.status == 404:
            raise NotFound(f"destination agent: {error.get('description', err)}") from err
        raise MigrationFailed(
            f"destination agent refused {method} {'/'.join(segments)}: {error.get('description', err)}",
            code=_known_code(error.get("code")),
            field=error.get("field"),
            details=error.get("details"),
        ) from err
    except ClientError as err:
        raise MigrationFailed(
            f"destination agent unreachable: {err}",
            code=Code.PEER_UNREACHABLE,
            details="check dstHost.agentUrl, the token and the network",
        ) from err


def _known_code(code: object) -> Code:
    """The destination's code as this agent's ``Code``; one it does not know (another version, no code at all)
    is ``PEER_ERROR``: the destination's body stays the cause."""
    return Code.known(code) or Code.PEER_ERROR


async def peer_call_when_free(
    peer: AgentClient,
    method: str,
    segments: tuple[str, ...],
    body: Any,
    *,
    within_s: float = BUSY_WAIT_S,
    every_s: float = BUSY_RETRY_S,
) -> Any:
    """``peer_call`` that waits, up to ``within_s``, while the destination's limits are full (its open
    incoming migrations or layer exports: 429 ``AGENT.BUSY``); any other answer is final. A cancel (the
    task's deadline) ends the wait."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await peer_call(peer, method, segments, body)
        except MigrationFailed as err:
            if err.code != Code.BUSY or time.monotonic() + every_s > deadline:
                raise
            log.info(
                "destination busy (%s %s): %s; trying again in %.0f s",
                method,
                "/".join(segments),
                err.description,
                every_s,
            )
        await asyncio.sleep(every_s)
