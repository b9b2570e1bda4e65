"""Middlewares: every error becomes an ErrorCode body with its status; 503 while stopping; who calls and
whether the route's role allows it (``agent.api.access``, the one place for both).

Order (outermost first): ``error_middleware`` -> ``guard_middleware`` -> handler. Nothing a client sends can
produce a bare 500: an unexpected exception is logged with its traceback and answered as ``AGENT.INTERNAL``.
The token is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from agent.api.access import CALLER, Role, Tokens, authorize, identify
from agent.api.keys import CONFIG, ROUTE_ROLES, SERVICE
from agent.errors import AgentError, Busy, Code, NotFound, PayloadTooLarge, ServiceStopping, Unauthorized

log = logging.getLogger(__name__)


def error_response(err: AgentError, status: int | None = None) -> web.Response:
    headers = None
    if isinstance(err, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="kvm-storage-agent"'}
    elif isinstance(err, Busy):
        headers = {"Retry-After": str(err.retry_after_s)}
    return json_response(err.to_error_code(), status=status or err.http_status, headers=headers)


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(body, default=str), status=status, content_type="application/json", headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except AgentError as err:
        if err.http_status >= 500:
            log.warning("%s %s: %s: %s", request.method, request.path, err.code, err.description)
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http(exc, request), exc.status)
    except Exception:
        log.exception("%s %s: unexpected error", request.method, request.path)
        return error_response(AgentError("internal error in the agent; see its log"), 500)


def _from_http(exc: web.HTTPException, request: web.Request) -> AgentError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"no endpoint {request.path}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            "request body too large",
            details=f"at most {request.app[CONFIG].limits.max_request_bytes} bytes are accepted",
        )
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return AgentError(
            f"{request.method} is not allowed on {request.path}",
            code=Code.METHOD_NOT_ALLOWED,
            details=f"allowed: {', '.join(sorted(exc.allowed_methods))}",
        )
    # Anything else aiohttp refuses itself (a malformed request, 411, 415, 431, ...): one registered code,
    # the status on the response and in the details.
    return AgentError(
        exc.reason or "HTTP error",
        code=Code.HTTP_REFUSED,
        details=f"HTTP {exc.status}" + (f": {exc.text}" if exc.text else ""),
    )


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE]
    if service.stopping.is_set():
        raise ServiceStopping("the agent is stopping")
    role = route_role(request)
    if role not in (Role.PUBLIC, Role.DIALECT):
        caller = identify(request, Tokens(service.token, service.cluster_token))
        authorize(request, caller, role)
        request[CALLER] = caller
    return await handler(request)


def route_role(request: web.Request) -> Role:
    """The role the matched route needs (``agent.api.routes``); a dialect's open paths apply their own
    rule; a path no route knows needs the management role (so that a stranger learns nothing of it)."""
    if request.path in request.app[SERVICE].open_paths:
        return Role.DIALECT
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return Role.MANAGEMENT
    role: Role = request.app[ROUTE_ROLES].get((route.method, resource.canonical), Role.MANAGEMENT)
    return role
