"""Host evacuations (issue 24): ``/v1/host/evacuations``; management only (``agent.api.access``)."""

from __future__ import annotations

from aiohttp import web

from agent.api.keys import EVACUATIONS
from agent.api.middleware import json_response
from agent.api.validation import path_uuid, read_object, validate
from agent.evacuation import EvacuationCancel, EvacuationRequest


async def start_evacuation(request: web.Request) -> web.StreamResponse:
    """``POST /v1/host/evacuations``: 202 with the evacuation's view (the same uuid: the same one)."""
    evacuation = validate(EvacuationRequest, await read_object(request))
    view, _created = await request.app[EVACUATIONS].create(evacuation)
    return json_response(
        view, status=202, headers={"Location": f"/v1/host/evacuations/{view['evacuationUuid']}"}
    )


async def list_evacuations(request: web.Request) -> web.StreamResponse:
    return json_response({"evacuations": request.app[EVACUATIONS].views()})


async def get_evacuation(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[EVACUATIONS].view(path_uuid(request, "evacuationUuid")))


async def cancel_evacuation(request: web.Request) -> web.StreamResponse:
    """``POST /v1/host/evacuations/{uuid}/cancel`` ``{running: finish|rollback}`` (the body is optional)."""
    evacuation_uuid = path_uuid(request, "evacuationUuid")
    cancel = EvacuationCancel()
    if (await request.read()).strip():
        cancel = validate(EvacuationCancel, await read_object(request))
    return json_response(await request.app[EVACUATIONS].cancel(evacuation_uuid, cancel))
