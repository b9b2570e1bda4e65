"""The host-wide budget (issue 24): ``GET`` and ``PATCH /v1/host/budget``."""

from __future__ import annotations

from aiohttp import web

from agent.api.keys import MANAGER
from agent.api.middleware import json_response
from agent.api.validation import read_object, validate
from agent.errors import InvalidRequest
from agent.migration.request import HostBudgetChange


async def get_budget(request: web.Request) -> web.StreamResponse:
    """``GET /v1/host/budget``: the outgoing budget, the moves at once, and each running task's share."""
    return json_response(request.app[MANAGER].host_budget_view())


async def change_budget(request: web.Request) -> web.StreamResponse:
    """``PATCH /v1/host/budget`` ``{outgoing, outgoingMigrations}``: applied at once, until the next start."""
    change = validate(HostBudgetChange, await read_object(request))
    if change.outgoing is None and change.outgoingMigrations is None:
        raise InvalidRequest("nothing to change: give outgoing and/or outgoingMigrations", field="outgoing")
    return json_response(request.app[MANAGER].change_host_budget(change))
