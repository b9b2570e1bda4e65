"""``AgentClient``: the agent's HTTP API as typed async methods (CLI, tests, and agent-to-agent calls).

The session can be borrowed (an agent passes its long-lived one and keeps ownership) or owned (the client
makes one and closes it in ``close``). The token goes into each request rather than into the session, so
one borrowed session can talk to several agents with different tokens.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncGenerator, Mapping
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel
from yarl import URL

from .errors import AgentUnreachable, ApiError, BadResponse, local_error
from .models import ErrorCodeBody, TaskView
from .sse import ServerEvent, SseParser

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)

# aiohttp raises these for "no usable answer"; anything else from it is a bug to surface, not to wrap.
_TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class AgentClient:
    """Async client of one agent at ``base_url`` (``http(s)://host:port``, optionally with a path prefix)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"agent URL must be http(s)://host[:port], not {base_url!r}")
        self._base = str(url.with_query(None).with_fragment(None)).rstrip("/")
        self._token = token
        self._session = session
        self._owns_session = session is None
        self._timeout = timeout
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else _default_ssl()

    @property
    def base_url(self) -> str:
        return self._base

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client made it; a borrowed one stays with its owner."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the API ---------------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health``; needs no token."""
        return cast(dict[str, Any], await self.request("GET", "v1", "health", auth=False))

    async def host(self) -> dict[str, Any]:
        """CPU, memory and the storage roots with their free and total bytes."""
        return cast(dict[str, Any], await self.request("GET", "v1", "host"))

    async def list_vms(self) -> list[dict[str, Any]]:
        return _unwrap_list(await self.request("GET", "v1", "vms"), "vms")

    async def vm(self, vm_uuid: str) -> dict[str, Any]:
        """One VM with its disks and their backing chains."""
        return cast(dict[str, Any], await self.request("GET", "v1", "vms", vm_uuid))

    async def start_migration(self, vm_uuid: str, body: Mapping[str, Any] | BaseModel) -> TaskView:
        """``POST /v1/vms/{vmUuid}/storage-migrations``; the body is the seed's request (DESIGN.md).

        A pydantic model (``MigrationRequest``) is sent without its unset and None fields, so the agent's
        defaults apply rather than the client's copy of them.
        """
        if isinstance(body, BaseModel):
            payload: Any = body.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        else:
            payload = dict(body)
        answer = await self.request("POST", "v1", "vms", vm_uuid, "storage-migrations", json_body=payload)
        return cast(TaskView, answer)

    async def tasks(self, *, state: str | None = None, vm_uuid: str | None = None) -> list[TaskView]:
        """Every task the agent knows, oldest first; optionally only those in ``state`` or of one VM."""
        query = {key: value for key, value in (("state", state), ("vmUuid", vm_uuid)) if value}
        answer = await self.request("GET", "v1", "tasks", query=query)
        return cast(list[TaskView], _unwrap_list(answer, "tasks"))

    async def task(self, task_uuid: str) -> TaskView:
        return cast(TaskView, await self.request("GET", "v1", "tasks", task_uuid))

    async def patch_task(
        self, task_uuid: str, *, bandwidth: int | None = None, downtime: int | None = None
    ) -> TaskView:
        """Retune a running task: ``bandwidth`` in MiB/s for the whole task, ``downtime`` in ms."""
        body: dict[str, int] = {}
        if bandwidth is not None:
            body["bandwidth"] = bandwidth
        if downtime is not None:
            body["downTime"] = downtime
        if not body:
            raise ValueError("patch_task needs bandwidth or downtime")
        return cast(TaskView, await self.request("PATCH", "v1", "tasks", task_uuid, json_body=body))

    async def cancel(self, task_uuid: str) -> TaskView:
        """Idempotent; the VM keeps running from its source volumes."""
        return cast(TaskView, await self.request("POST", "v1", "tasks", task_uuid, "cancel"))

    async def start_evacuation(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/host/evacuations``: many VMs off this host as one operation."""
        return cast(
            dict[str, Any], await self.request("POST", "v1", "host", "evacuations", json_body=dict(body))
        )

    async def evacuation(self, evacuation_uuid: str) -> dict[str, Any]:
        return cast(dict[str, Any], await self.request("GET", "v1", "host", "evacuations", evacuation_uuid))

    async def evacuations(self) -> list[dict[str, Any]]:
        return cast(
            list[dict[str, Any]],
            _unwrap_list(await self.request("GET", "v1", "host", "evacuations"), "evacuations"),
        )

    async def cancel_evacuation(self, evacuation_uuid: str, *, rollback: bool = False) -> dict[str, Any]:
        """The VMs not started never start; the running ones finish, or roll back with ``rollback``."""
        body = {"running": "rollback" if rollback else "finish"}
        answer = await self.request(
            "POST", "v1", "host", "evacuations", evacuation_uuid, "cancel", json_body=body
        )
        return cast(dict[str, Any], answer)

    async def events(
        self, task_uuid: str, *, read_timeout: float | None = None
    ) -> AsyncGenerator[ServerEvent, None]:
        """``GET /v1/tasks/{taskUuid}/events`` as parsed server-sent events, until the agent ends the stream.

        No total timeout: a migration takes as long as it takes. ``read_timeout`` bounds a silence of the
        connection (the agent sends a keep-alive comment every 15 s), after which the stream counts as lost
        (``AgentUnreachable``). Close the iterator (``contextlib.aclosing``) when leaving early.
        """
        url = self._url("v1", "tasks", task_uuid, "events")
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout.connect, sock_read=read_timeout)
        headers = {**self._auth_headers(), "Accept": "text/event-stream"}
        try:
            async with self._http().get(url, headers=headers, timeout=timeout, ssl=self._ssl) as resp:
                if resp.status >= 400:
                    raise ApiError(_error_body(resp.status, await resp.read(), resp.reason), resp.status)
                if resp.content_type != "text/event-stream":
                    what = f"expected an event stream, got {resp.content_type}"
                    raise BadResponse(local_error("CLIENT.BAD_RESPONSE", what), resp.status)
                parser = SseParser()
                async for chunk in resp.content.iter_any():
                    try:
                        events = parser.feed(chunk)
                    except ValueError as err:
                        raise BadResponse(local_error("CLIENT.BAD_RESPONSE", str(err)), resp.status) from err
                    for event in events:
                        yield event
        except _TRANSPORT_ERRORS as err:
            raise _unreachable(url, err) from err

    async def request(
        self,
        method: str,
        *segments: str,
        json_body: Any = None,
        query: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> Any:
        """One JSON call to ``/seg/ments`` (each segment quoted); the decoded answer or a ClientError.

        Public so that later endpoints (agent-to-agent incoming migrations) need no new plumbing.
        """
        url = self._url(*segments)
        if query:
            url = url.with_query(dict(query))
        headers = self._auth_headers() if auth else {}
        try:
            async with self._http().request(
                method, url, json=json_body, headers=headers, timeout=self._timeout, ssl=self._ssl
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise ApiError(_error_body(resp.status, raw, resp.reason), resp.status)
                if not raw:
                    return None
                try:
                    return json.loads(raw)
                except ValueError as err:
                    raise BadResponse(
                        local_error("CLIENT.BAD_RESPONSE", f"{method} {url.path}: answer is not JSON"),
                        resp.status,
                    ) from err
        except _TRANSPORT_ERRORS as err:
            raise _unreachable(url, err) from err

    # -- plumbing --------------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _url(self, *segments: str) -> URL:
        # Quote every segment whole: a uuid argument like "../x" must stay one path segment.
        return URL(self._base + "/" + "/".join(quote(s, safe="") for s in segments), encoded=True)

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}


def _default_ssl() -> ssl.SSLContext | bool:
    """The cluster CA named by ``KSA_CA_FILE`` (as for the CLI's ``--ca-file``), else the system's CAs."""
    ca_file = os.environ.get("KSA_CA_FILE")
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


def _unwrap_list(body: Any, key: str) -> list[Any]:
    """Accept both a bare JSON list and ``{key: [...]}``."""
    if isinstance(body, dict):
        body = body.get(key)
    if not isinstance(body, list):
        raise BadResponse(local_error("CLIENT.BAD_RESPONSE", f"expected a list of {key}"))
    return body


def _error_body(status: int, raw: bytes, reason: str | None) -> ErrorCodeBody:
    """The agent's ErrorCode, or one made up from whatever a non-agent (proxy, wrong port) answered."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]  # the seed's response shape: {"success": false, "error": ErrorCode}
    if isinstance(body, dict) and "code" in body:
        return cast(ErrorCodeBody, body)
    text = raw.decode("utf-8", "replace").strip()[:200]
    return local_error(f"CLIENT.HTTP_{status}", text or reason or f"HTTP {status}")


def _unreachable(url: URL, err: BaseException) -> AgentUnreachable:
    what = "timed out" if isinstance(err, TimeoutError) else (str(err) or type(err).__name__)
    host = f"{url.scheme}://{url.host}:{url.port}"
    return AgentUnreachable(local_error("CLIENT.UNREACHABLE", f"agent at {host} unreachable: {what}"))
