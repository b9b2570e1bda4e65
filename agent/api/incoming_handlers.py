"""Agent-to-agent endpoints: the destination side of a cross-host migration (``agent.migration.incoming``).

The source agent calls them with this agent's token or the cluster token; the management plane never needs to.
"""

from __future__ import annotations

from aiohttp import web

from agent.api.keys import INCOMING
from agent.api.middleware import json_response
from agent.api.validation import path_uuid, read_object, validate
from agent.errors import VirtError
from agent.migration.incoming import IncomingService, IncomingSpec


def _service(request: web.Request) -> IncomingService:
    service = request.app[INCOMING]
    if service is None:
        raise VirtError("libvirt is not connected in this agent", code="AGENT.LIBVIRT_UNAVAILABLE")
    return service


async def prepare(request: web.Request) -> web.StreamResponse:
    """``POST /v1/incoming-migrations``: create the target images; idempotent for the same spec."""
    spec = validate(IncomingSpec, await read_object(request))
    return json_response(await _service(request).prepare(spec), status=201)


async def get(request: web.Request) -> web.StreamResponse:
    return json_response(await _service(request).get(path_uuid(request, "migrationId")))


async def commit(request: web.Request) -> web.StreamResponse:
    """``POST /v1/incoming-migrations/{id}/commit``: the VM runs here from the new paths."""
    return json_response(await _service(request).commit(path_uuid(request, "migrationId")))


async def abort(request: web.Request) -> web.StreamResponse:
    """``DELETE /v1/incoming-migrations/{id}``: remove what it created (idempotent)."""
    return json_response(await _service(request).abort(path_uuid(request, "migrationId")))
