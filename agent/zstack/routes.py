"""The ZStack paths on the agent's aiohttp app, and who may call them.

ZStack sends no token: these paths skip the bearer check (``ServiceState.open_paths``) and answer only
clients whose source address is in ``[zstack] allowed_networks`` (403 otherwise). Asynchronous calls (header
``taskuuid``) get 200 with an empty body at once and their answer later at ``callbackurl``; the same
commands without ``taskuuid`` are answered in the response. ``/host/connect`` and ``/host/echo`` are
synchronous only. ZStack registers every path with and without a trailing slash; so does this.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from agent.api.keys import (
    CONFIG,
    INVENTORY,
    JOURNAL,
    MANAGER,
    OUTBOX,
    PROGRESS,
    SERVICE,
    SESSION,
    VIRT_HOST,
)
from agent.api.middleware import json_response
from agent.api.validation import BODY_TIMEOUT_S, invalid_from
from agent.errors import InvalidRequest
from agent.report.destinations import check_report_url
from agent.zstack.service import ZStackService
from agent.zstack.wire import (
    BLOCK_COPY,
    CALLBACK_URL_HEADER,
    MIGRATE,
    TASK_UUID_HEADER,
    TASK_UUID_RE,
    URL_RE,
    CancelCmd,
    ConnectCmd,
    PingCmd,
    answer,
    error_message,
)

log = logging.getLogger(__name__)

ZSTACK = web.AppKey("zstack", ZStackService)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Handler:
    """403 unless the client's address is in ``[zstack] allowed_networks``."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        networks = request.app[CONFIG].zstack.allowed_networks
        try:
            address = ipaddress.ip_address((request.remote or "").split("%", 1)[0])
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address is None or not any(address in network for network in networks):
            log.warning(
                "zstack: %s %s from %s refused: not in allowed_networks",
                request.method,
                request.path,
                request.remote,
            )
            return web.Response(status=403, text=f"{request.remote} is not allowed to use the ZStack dialect")
        return await handler(request)

    guarded.__name__ = handler.__name__
    return guarded


async def _body(request: web.Request) -> bytes:
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await request.read()
    except TimeoutError as err:
        raise web.HTTPRequestTimeout(text="request body not received in time") from err


def _async_headers(request: web.Request) -> tuple[str, str] | None:
    """``(taskuuid, callbackurl)`` of an asynchronous call, None for a synchronous one; 400 when malformed."""
    task_uuid = request.headers.get(TASK_UUID_HEADER)
    if task_uuid is None:
        return None
    callback = request.headers.get(CALLBACK_URL_HEADER, "")
    if not TASK_UUID_RE.match(task_uuid):
        raise web.HTTPBadRequest(text=f"malformed {TASK_UUID_HEADER} header")
    if not URL_RE.match(callback):
        raise web.HTTPBadRequest(text=f"{CALLBACK_URL_HEADER} header missing or not an http(s) URL")
    return task_uuid, callback


async def _check_callback(request: web.Request, url: str, field: str = CALLBACK_URL_HEADER) -> None:
    """Answers go only to the management server that asked or the configured networks (400 otherwise)."""
    config = request.app[CONFIG]
    await check_report_url(url, allowed=config.report_networks(), submitter=request.remote, field=field)


def _migration(kind: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = _async_headers(request)
        if headers is None:
            raise web.HTTPBadRequest(text="taskUuid missing in request header")
        await _check_callback(request, headers[1])
        body = await _body(request)
        await request.app[ZSTACK].receive(kind, headers[0], headers[1], body)
        return web.Response(status=200)

    handler.__name__ = "migrate" if kind == MIGRATE else "block_live_migration"
    return handler


def _command(work: Callable[[ZStackService, bytes], Awaitable[dict[str, Any]]]) -> Handler:
    """A small command: answered in the response, or at ``callbackurl`` when called with ``taskuuid``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = _async_headers(request)
        body = await _body(request)
        service = request.app[ZSTACK]
        if headers is None:
            return json_response(await _run(work, service, body))
        await _check_callback(request, headers[1])
        service.reply_later(headers[0], headers[1], lambda: _run(work, service, body))
        return web.Response(status=200)

    handler.__name__ = work.__name__
    return handler


async def _run(
    work: Callable[[ZStackService, bytes], Awaitable[dict[str, Any]]], service: ZStackService, body: bytes
) -> dict[str, Any]:
    try:
        return await work(service, body)
    except InvalidRequest as err:
        return answer(False, error_message(err.to_error_code()))


def _parse(model: type[Any], body: bytes) -> Any:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as err:
        raise invalid_from(err) from err


async def _cancel(service: ZStackService, body: bytes) -> dict[str, Any]:
    return await service.cancel(_parse(CancelCmd, body))


async def _ping(service: ZStackService, body: bytes) -> dict[str, Any]:
    _parse(PingCmd, body)
    return service.ping()


async def connect(request: web.Request) -> web.StreamResponse:
    """``/host/connect``: synchronous only (ZStack's sync handler refuses a ``taskuuid``)."""
    if TASK_UUID_HEADER in request.headers:
        raise web.HTTPBadRequest(text="/host/connect is synchronous; a taskuuid header is not accepted")
    body = await _body(request)
    try:
        cmd = _parse(ConnectCmd, body)
        if cmd.sendCommandUrl:
            await _check_callback(request, cmd.sendCommandUrl, "sendCommandUrl")
    except InvalidRequest as err:
        return json_response(answer(False, error_message(err.to_error_code())))
    return json_response(await request.app[ZSTACK].connect(cmd))


async def echo(request: web.Request) -> web.StreamResponse:
    """``/host/echo``: synchronous, 200 with an empty body."""
    await _body(request)
    return web.Response(status=200)


ROUTES: tuple[tuple[str, Handler], ...] = (
    ("/vm/migrate", _migration(MIGRATE)),
    ("/vm/blklivemigration", _migration(BLOCK_COPY)),
    ("/job/cancel", _command(_cancel)),
    ("/host/ping", _command(_ping)),
    ("/host/connect", connect),
    ("/host/echo", echo),
)


def mount(app: web.Application) -> None:
    """Add the ZStack paths (token-free, source-network guarded) and the service's lifecycle to ``app``.

    Call after the agent's own routes and ``cleanup_ctx`` are in place: the service needs the task manager.
    Does nothing unless ``[zstack] enabled`` is set in the config.
    """
    if not app[CONFIG].zstack.enabled:
        return
    paths = []
    for path, handler in ROUTES:
        for variant in (path, path + "/"):
            app.router.add_post(variant, _guarded(handler))
            paths.append(variant)
    service = app[SERVICE]
    service.open_paths = service.open_paths | frozenset(paths)
    app.cleanup_ctx.append(_zstack_ctx)


async def _zstack_ctx(app: web.Application) -> AsyncIterator[None]:
    service = ZStackService(
        app[CONFIG],
        app[MANAGER],
        app[JOURNAL],
        app[OUTBOX],
        app[PROGRESS],
        app[SESSION],
        inventory=app[INVENTORY],
        virt_host=app[VIRT_HOST],
    )
    app[ZSTACK] = service
    await service.start()
    try:
        yield
    finally:
        await service.stop()
