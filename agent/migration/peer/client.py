"""Agent-to-agent calls from a source agent to a destination agent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from agent.client import AgentClient, ApiError, ClientError
from agent.config import AgentConfig
from agent.errors import Code, InvalidRequest, MigrationFailed, NotFound
from agent.migration.peer.wire import IncomingSpec, Prepared
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


class DestinationAgent:
    """The destination agent as the source agent speaks to it: the one place the agent-to-agent paths
    (``/v1/incoming-migrations``) are written. Every call raises what ``peer_call`` makes
    of a failure: ``NotFound`` for a 404, else ``MigrationFailed`` with the destination's code (or
    ``PEER_UNREACHABLE``). Used as ``async with``, it closes its HTTP client."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client

    @classmethod
    def of(cls, request: MigrationRequest, config: AgentConfig) -> DestinationAgent:
        return cls(peer_client(request, config))

    async def __aenter__(self) -> DestinationAgent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.close()

    async def offer(self) -> Any:
        """What the destination offers a peer (its host uuid and storage roots). Unlike the calls below it
        raises the client's own ``ClientError``: its caller (the ZStack dialect) words that failure itself."""
        return await self.client.request("GET", "v1", "incoming-migrations")

    async def storages(self) -> list[dict[str, Any]]:
        """The destination's primary storages as it offers them to peers (uuid, kind, location, ...)."""
        answer = await self._call("GET", (), None)
        listed = answer.get("storage") if isinstance(answer, dict) else None
        return [entry for entry in listed or [] if isinstance(entry, dict)]

    async def prepare(self, spec: IncomingSpec) -> Prepared:
        """Create the incoming migration's files and record; the answer names them."""
        answer = await self._call("POST", (), spec.model_dump(), when_free=True)
        try:
            return Prepared.model_validate(answer)
        except ValidationError as err:
            raise MigrationFailed(
                "the destination agent's answer to prepare is not understood",
                code=Code.PEER_ERROR,
                details=str(err).splitlines()[0],
            ) from err

    async def open_layer(self, migration_id: str, ref: Mapping[str, Any]) -> Any:
        """Export one prepared layer over NBD for writing; the answer holds its ``endpoint`` and ``path``."""
        return await self._call("POST", (migration_id, "layers"), dict(ref), when_free=True)

    async def finish_layer(self, migration_id: str, ref: Mapping[str, Any], digest: Mapping[str, Any]) -> Any:
        """Close the layer's export and have the destination check its copy against the source's digest."""
        return await self._call("POST", (migration_id, "layers", "finish"), {**ref, "digest": dict(digest)})

    async def define(self, migration_id: str, xml: str) -> Any:
        """Define the VM there (an offline move) from the rewritten XML."""
        return await self._call("POST", (migration_id, "define"), {"xml": xml})

    async def commit(self, migration_id: str) -> Any:
        """The VM runs there from the prepared files: the destination forgets its record and keeps them."""
        return await self._call("POST", (migration_id, "commit"), {})

    async def abort(self, migration_id: str) -> Any:
        """Remove what was prepared for the migration (the VM did not arrive)."""
        return await self._call("DELETE", (migration_id,), None)

    async def vm(self, migration_id: str) -> Any:
        """The destination agent's view of the migration's VM (its state and disks)."""
        return await self._call("GET", (migration_id, "vm"), None)

    async def _call(
        self, method: str, segments: tuple[str, ...], body: Any, *, when_free: bool = False
    ) -> Any:
        """``when_free``: a call that opens something there (a migration, an export) waits while the
        destination's limits are full (``peer_call_when_free``)."""
        call = peer_call_when_free if when_free else peer_call
        return await call(self.client, method, ("v1", "incoming-migrations", *segments), body)


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
