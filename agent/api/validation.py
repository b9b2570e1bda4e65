"""Turning a request body into a validated model, and the checks only this host can make.

Bodies are parsed with pydantic in strict JSON mode (``"100"`` is not a number); the first error names its
field as a path (``migrateVm.bandwidth``, ``volumes[0].dstInstallPath``) and ``details`` lists all of them.
Storage uuids and destination paths of a same-host move are checked against the config's storage roots,
paths with symlinks resolved (off the loop: ``realpath`` touches the filesystem).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent.config import AgentConfig
from agent.errors import Code, InvalidRequest
from agent.migration.request import MigrationRequest, normalise_uuid
from agent.storage.roots import StorageRoots

ModelT = TypeVar("ModelT", bound=BaseModel)

#: How long a client may take to send its body; a stuck client then gets 408 and its handler ends.
BODY_TIMEOUT_S = 30.0

STORAGE_FIELD = "primaryStorageMigrateVm.dstPrimaryStorageUuid"


class RequestTimeout(InvalidRequest):
    code = Code.REQUEST_TIMEOUT
    http_status = 408


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("volumes", 0, "dstInstallPath")`` -> ``volumes[0].dstInstallPath``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<body>"


def invalid_from(err: ValidationError) -> InvalidRequest:
    problems = err.errors(include_url=False)
    lines = []
    for problem in problems:
        where = field_path(tuple(problem["loc"]))
        message = "unknown field" if problem["type"] == "extra_forbidden" else problem["msg"]
        lines.append(f"{where}: {message}")
    first = field_path(tuple(problems[0]["loc"])) if problems else "<body>"
    return InvalidRequest(lines[0] if lines else "invalid body", field=first, details="; ".join(lines))


async def read_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 when it is not one, 413 (by aiohttp) when over the size limit."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            raw = await request.read()
    except TimeoutError as err:
        raise RequestTimeout(f"request body not received within {BODY_TIMEOUT_S:g} s") from err
    if not raw.strip():
        raise InvalidRequest("the body must be a JSON object", field="<body>")
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InvalidRequest("the body is not valid JSON", field="<body>", details=str(err)) from err
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object", field="<body>")
    return data


def validate(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    try:
        return model.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as err:
        raise invalid_from(err) from err


def path_uuid(request: web.Request, name: str) -> str:
    """A uuid from the URL path (dashed or 32 hex), normalised; 400 naming ``name`` otherwise."""
    return parse_uuid(request.match_info[name], name)


def parse_uuid(raw: str, name: str) -> str:
    try:
        return normalise_uuid(raw)
    except ValueError as err:
        raise InvalidRequest(f"{name} {raw!r} is not a uuid", field=name) from err


def merge_headers(data: dict[str, Any], request: web.Request) -> None:
    """ZStack sends ``taskuuid`` and ``callbackurl`` as headers; the body wins when both are given."""
    for header, key in (("taskuuid", "taskUuid"), ("callbackurl", "callbackUrl")):
        value = request.headers.get(header)
        if not value:
            continue
        if data.get(key) in (None, ""):
            data[key] = value
        elif key == "taskUuid" and _same_uuid(str(data[key]), value) is False:
            raise InvalidRequest(f"header {header} and body {key} differ", field=key)


def _same_uuid(a: str, b: str) -> bool | None:
    try:
        return normalise_uuid(a) == normalise_uuid(b)
    except ValueError:
        return None


def is_same_host(request: MigrationRequest, config: AgentConfig) -> bool:
    dst = request.primaryStorageMigrateVm.dstHostUuid
    return not dst or dst == config.host_uuid


async def check_destination(request: MigrationRequest, config: AgentConfig) -> None:
    """What this host can check: its storage uuid and paths (same host), a full ``dstHost`` (other host)."""
    if not is_same_host(request, config):
        dst_host = request.dstHost
        if dst_host is None:
            raise InvalidRequest(
                "a move to another host needs dstHost {uuid, agentUrl, migrationAddress}", field="dstHost"
            )
        if dst_host.uuid != request.primaryStorageMigrateVm.dstHostUuid:
            raise InvalidRequest(
                "dstHost.uuid differs from primaryStorageMigrateVm.dstHostUuid", field="dstHost.uuid"
            )
        if not dst_host.agentUrl:
            raise InvalidRequest(
                "a move to another host needs the destination's agentUrl", field="dstHost.agentUrl"
            )
        return
    # Any kind: a running VM's disks move onto files, an RBD pool or block devices (a stopped VM's onto
    # files only, which its engine says).
    root = StorageRoots.from_config(config).storage(
        request.primaryStorageMigrateVm.dstPrimaryStorageUuid, STORAGE_FIELD
    )
    for index, volume in enumerate(request.volumes):
        if volume.dstInstallPath:
            await asyncio.to_thread(root.confine, volume.dstInstallPath, f"volumes[{index}].dstInstallPath")
