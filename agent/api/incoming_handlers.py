"""Agent-to-agent endpoints: the destination side of a cross-host migration (``agent.migration.incoming``).

The source agent calls them with this agent's token or the cluster token; the management plane never needs to.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from agent.api.keys import INCOMING
from agent.api.middleware import json_response
from agent.api.validation import path_uuid, read_object, validate
from agent.errors import Code, VirtError
from agent.migration.incoming import IncomingService, IncomingSpec


def _service(request: web.Request) -> IncomingService:
    service = request.app[INCOMING]
    if service is None:
        raise VirtError("libvirt is not connected in this agent", code=Code.LIBVIRT_UNAVAILABLE)
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


class LayerRef(BaseModel):
    """Which lower layer of which disk (base = 0)."""

    model_config = ConfigDict(extra="forbid")
    target: str = Field(pattern="^[a-z]{2,3}[a-z]{1,2}$")
    index: int = Field(ge=0, le=63)


class LayerDone(LayerRef):
    digest: dict[str, object]


async def open_layer(request: web.Request) -> web.StreamResponse:
    """``POST .../{id}/layers``: create a lower layer and export it over NBD for the source to fill."""
    ref = validate(LayerRef, await read_object(request))
    migration_id = path_uuid(request, "migrationId")
    return json_response(await _service(request).open_layer(migration_id, ref.target, ref.index), status=201)


async def finish_layer(request: web.Request) -> web.StreamResponse:
    """``POST .../{id}/layers/finish``: close the export and verify the layer against the source's digest."""
    done = validate(LayerDone, await read_object(request))
    migration_id = path_uuid(request, "migrationId")
    return json_response(
        await _service(request).finish_layer(migration_id, done.target, done.index, dict(done.digest))
    )


class Definition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    xml: str = Field(max_length=512 * 1024)


async def define(request: web.Request) -> web.StreamResponse:
    """``POST .../{id}/define``: offline move: define the VM here on its transferred images."""
    body = validate(Definition, await read_object(request))
    return json_response(await _service(request).define(path_uuid(request, "migrationId"), body.xml))
