"""Agent-to-agent endpoints: the destination side of a cross-host migration (``agent.migration.incoming``).

Only peer agents call them (``agent.api.access``: the ``peer`` role); every record is bound to the peer that
prepared it, by the caller's name. The management plane never needs to call them.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from agent.api.access import CALLER
from agent.api.info_handlers import storage_entries
from agent.api.keys import CONFIG, INCOMING, INVENTORY
from agent.api.middleware import json_response
from agent.api.validation import path_uuid, read_object, validate
from agent.errors import Code, VirtError
from agent.migration.incoming import IncomingService, IncomingSpec


def _peer(request: web.Request) -> str:
    return request[CALLER].peer_name


def _service(request: web.Request) -> IncomingService:
    service = request.app[INCOMING]
    if service is None:
        raise VirtError("libvirt is not connected in this agent", code=Code.LIBVIRT_UNAVAILABLE)
    return service


async def offer(request: web.Request) -> web.StreamResponse:
    """``GET /v1/incoming-migrations``: what a source needs to plan a move here: this host's uuid and its
    primary storages (uuid, kind, location, path, free and total bytes)."""
    config = request.app[CONFIG]
    return json_response({"hostUuid": config.host_uuid, "storage": await storage_entries(config)})


async def prepare(request: web.Request) -> web.StreamResponse:
    """``POST /v1/incoming-migrations``: create the target images; idempotent for the same spec."""
    spec = validate(IncomingSpec, await read_object(request))
    return json_response(await _service(request).prepare(spec, _peer(request)), status=201)


async def get(request: web.Request) -> web.StreamResponse:
    return json_response(await _service(request).get(path_uuid(request, "migrationId"), _peer(request)))


async def vm(request: web.Request) -> web.StreamResponse:
    """``GET .../{id}/vm``: the migration's VM as this host sees it (also once the migration settled)."""
    vm_uuid = _service(request).vm_of(path_uuid(request, "migrationId"), _peer(request))
    inventory = request.app[INVENTORY]
    if inventory is None:
        raise VirtError("libvirt is not connected in this agent", code=Code.LIBVIRT_UNAVAILABLE)
    return json_response(await inventory.describe_vm(vm_uuid))


async def commit(request: web.Request) -> web.StreamResponse:
    """``POST /v1/incoming-migrations/{id}/commit``: the VM runs here from the new paths."""
    return json_response(await _service(request).commit(path_uuid(request, "migrationId"), _peer(request)))


async def abort(request: web.Request) -> web.StreamResponse:
    """``DELETE /v1/incoming-migrations/{id}``: remove what it created (idempotent)."""
    return json_response(await _service(request).abort(path_uuid(request, "migrationId"), _peer(request)))


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
    return json_response(
        await _service(request).open_layer(migration_id, _peer(request), ref.target, ref.index), status=201
    )


async def finish_layer(request: web.Request) -> web.StreamResponse:
    """``POST .../{id}/layers/finish``: close the export and verify the layer against the source's digest."""
    done = validate(LayerDone, await read_object(request))
    migration_id = path_uuid(request, "migrationId")
    return json_response(
        await _service(request).finish_layer(
            migration_id, _peer(request), done.target, done.index, dict(done.digest)
        )
    )


class Definition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    xml: str = Field(max_length=512 * 1024)


async def define(request: web.Request) -> web.StreamResponse:
    """``POST .../{id}/define``: offline move: define the VM here on its transferred images."""
    body = validate(Definition, await read_object(request))
    return json_response(
        await _service(request).define(path_uuid(request, "migrationId"), _peer(request), body.xml)
    )
