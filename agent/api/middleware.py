"""Middlewares: every error becomes an ErrorCode body with its status; 503 while stopping; bearer auth
(agent-to-agent paths over TLS also need a cluster client certificate: agent/security.py).

Order (outermost first): ``error_middleware`` -> ``guard_middleware`` -> handler. Nothing a client sends can
produce a bare 500: an unexpected exception is logged with its traceback and answered as ``AGENT.INTERNAL``.
The token is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from agent.api.keys import CONFIG, SERVICE
from agent.errors import AgentError, Code, NotFound, PayloadTooLarge, ServiceStopping, Unauthorized
from agent.security import require_cluster_certificate

log = logging.getLogger(__name__)

#: Paths answered without a token.
PUBLIC_PATHS = frozenset({"/v1/health"})


def error_response(err: AgentError, status: int | None = None) -> web.Response:
    headers = (
        {"WWW-Authenticate": 'Bearer realm="kvm-storage-agent"'} if isinstance(err, Unauthorized) else None
    )
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
    require_cluster_certificate(request)
    if request.path not in PUBLIC_PATHS and request.path not in service.open_paths:
        check_token(request.headers.get("Authorization"), service.token, *service.other_tokens)
    return await handler(request)


def check_token(header: str | None, token: str, *others: str) -> None:
    """Raise ``Unauthorized`` unless ``header`` is ``Bearer <token>`` for one of the accepted tokens
    (constant-time comparison, every token compared)."""
    if header is None:
        raise Unauthorized("missing Authorization: Bearer <token>")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("Authorization must be: Bearer <token>")
    presented = given.strip().encode()
    matches = [hmac.compare_digest(presented, accepted.encode()) for accepted in (token, *others)]
    if not any(matches):
        raise Unauthorized("wrong token")
